"""The `pipeline` command: the typer app, its `worker`, `status`, `fake-claude` and `demo`
commands, and the other modules' commands registered on it in `--help` order.

Exit codes: 0 done; 1 nothing found, or some input lines rejected; 2 an error (one line, no
traceback: a bad setting names its field, an unreachable Redis names its redacted URL).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from redis.exceptions import RedisError
from rich.markup import escape

from pipeline.claude.settings import Settings
from pipeline.cli import render
from pipeline.cli.common import (
    ConfigOpt,
    JsonOpt,
    connection,
    err,
    exit_with,
    out,
    run_async,
    settings_from,
    setup_logging,
)
from pipeline.cli.cost import cost
from pipeline.cli.dlq import dlq_app
from pipeline.cli.submit import result, submit
from pipeline.runtime.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.cli.status import PipelineStatus
    from pipeline.runtime.stage import App

_T = TypeVar("_T")

app = typer.Typer(
    help="Run Claude tasks from Redis Streams: nothing lost, nothing paid twice.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Run Claude tasks from Redis Streams: nothing lost, nothing paid twice."""


@app.command()
def worker(
    stage: Annotated[
        list[str],
        typer.Option(
            "--stage",
            "-s",
            help="Stage to run (repeatable): cache-check, router, claude-call, store.",
        ),
    ] = [],  # noqa: B006
    all_stages: Annotated[bool, typer.Option("--all", help="Run every stage.")] = False,
    lane: Annotated[
        list[str],
        typer.Option(
            "--lane",
            help="Only these lanes of a laned stage (repeatable), e.g. claude-call's "
            "--lane haiku: scale each model family's callers on its own.",
        ),
    ] = [],  # noqa: B006
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency", "-n", min=1, help="Entries in flight per stage (default from config)."
        ),
    ] = None,
    consumer: Annotated[
        str | None,
        typer.Option(help="Stable consumer name (default: <hostname>-<n>, the lowest free n)."),
    ] = None,
    app_spec: Annotated[
        str, typer.Option("--app", help="module:attribute of the App to run.")
    ] = "stages:app",
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Serve Prometheus metrics on this port (0: any free port; default from config).",
        ),
    ] = None,
    config: ConfigOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at DEBUG level.")] = False,
) -> None:
    """Run stage workers until SIGTERM/SIGINT (then finish or hand back in-flight work)."""
    from pipeline.cli.worker import load_app, run_worker

    setup_logging(verbose)
    settings = settings_from(config)
    the_app = load_app(app_spec, settings)
    names = [s.name for s in the_app.stages] if all_stages else stage
    if not names:
        raise typer.BadParameter("give --stage NAME (repeatable) or --all")
    for name in names:
        the_app.stage(name)
    known = {ln for name in names for ln in the_app.stage(name).lanes}
    for wanted in lane:
        if wanted not in known:
            choices = ", ".join(sorted(known)) or "none: no laned stage selected"
            raise exit_with(f"error: --lane: no lane {wanted!r} (lanes: {choices})", 2)
    run_async(
        run_worker(
            the_app,
            names,
            settings,
            lanes=lane,
            concurrency=concurrency,
            consumer=consumer,
            metrics_port=metrics_port,
        )
    )


# ---- producing and reading results: pipeline.cli.submit -------------------------------------

app.command()(submit)
app.command()(result)


# ---- operating ------------------------------------------------------------------------------


@app.command()
def status(
    app_spec: Annotated[
        str, typer.Option("--app", help="module:attribute of the App whose stages to show.")
    ] = "stages:app",
    as_json: JsonOpt = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch", "-w", help="Refresh until Ctrl-C, with throughput, cache and 429 rates."
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.1, help="With --watch: seconds between refreshes.")
    ] = 2.0,
    iterations: Annotated[
        int, typer.Option(min=0, hidden=True, help="With --watch: stop after N refreshes.")
    ] = 0,
    config: ConfigOpt = None,
) -> None:
    """Backlog, pending, lag, consumers, oldest pending age and retries per stage; DLQ; pauses;
    Redis's eviction policy and persistence, with what in them may lose data."""
    import msgspec

    from pipeline.cli.status import gather
    from pipeline.cli.worker import load_app
    from pipeline.runtime.keys import Keys
    from pipeline.runtime.redis_conn import redacted

    settings = settings_from(config)
    the_app = load_app(app_spec, settings)
    if watch:
        _watch_status(settings, the_app, interval, iterations)
        return

    async def gather_all() -> PipelineStatus:
        async with connection(settings) as redis:
            return await gather(redis, Keys(settings.prefix), the_app, settings.ratelimit,
                                       durability=True)  # fmt: skip

    state = run_async(gather_all())
    if as_json:
        out.print_json(msgspec.json.encode(state).decode())
    else:
        where = f"{redacted(settings.redis.url)}  prefix {settings.prefix}"
        out.print(render.status_view(state, where))


def _watch_status(settings: Settings, the_app: App, interval_s: float, iterations: int) -> None:
    """A live view on a terminal (one frame per refresh when piped); Ctrl-C exits with 0."""
    from rich.live import Live

    from pipeline.cli.watch import WatchView, run_watch
    from pipeline.runtime.keys import Keys
    from pipeline.runtime.redis_conn import redacted

    where = f"{redacted(settings.redis.url)}  prefix {settings.prefix}"

    async def run(show: Callable[[WatchView], None]) -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):  # end between polls, never mid-command
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        async with connection(settings) as redis:
            await run_watch(redis, Keys(settings.prefix), the_app, settings, show,
                            interval_s=interval_s, iterations=iterations, stop=stop)  # fmt: skip

    try:
        if out.is_terminal:
            with Live(console=out, auto_refresh=False, transient=False) as live:
                run_async(run(lambda v: live.update(render.watch_view(v, where), refresh=True)))
        else:
            run_async(run(lambda v: out.print(render.watch_view(v, where))))
    except KeyboardInterrupt:
        pass


# ---- the fake Claude API --------------------------------------------------------------------


@app.command("fake-claude")
def fake_claude(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0 picks a free one).")] = 8787,
    latency_ms: Annotated[
        float, typer.Option(help="Reply delay in ms (the median when --latency-sigma > 0).")
    ] = 0.0,
    latency_sigma: Annotated[
        float, typer.Option(help="Lognormal spread of the delay (0: fixed delay).")
    ] = 0.0,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute per key and family.")] = None,
    itpm: Annotated[int | None, typer.Option(help="Input tokens per minute.")] = None,
    otpm: Annotated[int | None, typer.Option(help="Output tokens per minute.")] = None,
    overloaded_rate: Annotated[
        float, typer.Option(help="Share of requests answered 529 overloaded (0-1).")
    ] = 0.0,
    error_rate: Annotated[float, typer.Option(help="Share of requests answered 500 (0-1).")] = 0.0,
    bad_key: Annotated[
        list[str] | None,
        typer.Option(help="An API key answered 401 (repeatable)."),
    ] = None,
    forbidden_key: Annotated[
        list[str] | None,
        typer.Option(help="An API key answered 403 (repeatable)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for latency and faults.")] = 0,
) -> None:
    """Serve a fake of the Anthropic Messages API until Ctrl-C (for tests and demos)."""
    import msgspec

    from pipeline.fake_claude import FakeClaudeConfig, run_forever

    values = {
        "host": host,
        "port": port,
        "latency_ms": latency_ms,
        "latency_sigma": latency_sigma,
        "rpm": rpm,
        "itpm": itpm,
        "otpm": otpm,
        "overloaded_rate": overloaded_rate,
        "server_error_rate": error_rate,
        "bad_keys": bad_key or [],
        "forbidden_keys": forbidden_key or [],
        "seed": seed,
    }
    try:
        fake = msgspec.convert(values, FakeClaudeConfig)
    except (msgspec.ValidationError, ValueError) as exc:
        raise exit_with(f"error: fake-claude: {exc}", 2) from None
    run_forever(fake)


@app.command()
def demo(
    tasks: Annotated[
        int, typer.Option("--tasks", "-t", min=1, max=100_000, help="How many sample tasks to run.")
    ] = 300,
    workers: Annotated[int, typer.Option(min=1, max=16, help="Worker processes (--all).")] = 2,
    keep: Annotated[bool, typer.Option(help="Keep the demo's keys in Redis afterwards.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Everything at once for a first look: Redis, fake Claude API, workers, sample tasks.

    The fake Claude API is used unless ANTHROPIC_API_KEY is set. Uses Redis at REDIS_URL if
    reachable, else starts a private redis-server. Leaves nothing running, and deletes its
    keys (a fresh prefix) unless --keep.
    """
    from pipeline.cli.demo import run_demo

    report = run_async(run_demo(settings_from(config), tasks=tasks, workers=workers, keep=keep))
    if report.completed + report.failed < report.submitted:
        raise typer.Exit(1)


app.add_typer(dlq_app, name="dlq")


app.command()(cost)


def main() -> None:
    """Entry point: one clear line for expected errors, not a traceback."""
    try:
        app()
    except PipelineError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise SystemExit(2) from None
    except RedisError as exc:
        err.print(f"[bold red]error:[/] redis: {escape(str(exc))}")
        raise SystemExit(2) from None
    except KeyError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc.args[0]))}")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
