"""The `pipeline` command. Each command parses, calls one function and renders the answer.

Exit codes: 0 done; 1 nothing found, or some input lines rejected; 2 an error (one line, no
traceback: a bad setting names its field, an unreachable Redis names its redacted URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

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


# ---- producing and reading results ----------------------------------------------------------


@app.command()
def submit(
    prompt: Annotated[
        str | None,
        typer.Argument(help="The prompt (the user message); '-' reads it from stdin."),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            "-f",
            help="Submit a JSONL file instead: one task object per line, with the wire format's "
            "keys (prompt, type, model, …); the task options below are then ignored.",
            dir_okay=False,
        ),
    ] = None,
    out_file: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="With --file: write the ids here, one per line."),
    ] = None,
    task_type: Annotated[
        str, typer.Option("--type", "-t", help="Task type, for routing rules and cost.")
    ] = "default",
    model: Annotated[
        str, typer.Option(help="auto (the router decides), haiku/sonnet/opus, or a model id.")
    ] = "auto",
    max_tokens: Annotated[
        int | None, typer.Option(help="Output token limit (default from config).")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature, 0-1.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    messages: Annotated[
        str | None,
        typer.Option(help="Instead of PROMPT: a JSON array of messages (multi-turn)."),
    ] = None,
    task_id: Annotated[
        str | None,
        typer.Option("--id", help="Task id / idempotency key (default: the stream entry id)."),
    ] = None,
    cache: Annotated[
        bool, typer.Option("--cache/--no-cache", help="Use the response cache.")
    ] = True,
    ttl: Annotated[int | None, typer.Option(help="Result time-to-live in seconds.")] = None,
    metadata: Annotated[
        str | None, typer.Option(help="JSON object returned with the result.")
    ] = None,
    wait: Annotated[
        float | None,
        typer.Option(help="Wait up to SECONDS for the result and print it instead of the id."),
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Submit one task (prints its id) or a JSONL file of tasks (--file, with progress)."""
    settings = settings_from(config)
    if file is not None:
        if prompt is not None or messages is not None or wait is not None:
            raise typer.BadParameter("--file takes no PROMPT, --messages or --wait")
        with _producer_tracing():
            report = run_async(_submit_file(settings, file, out_file))
        if out_file is None:
            sys.stdout.write("".join(f"{i}\n" for i in report.ids))
        submitted = f"{len(report.ids)} task(s) were submitted"
        if report.stopped:
            raise exit_with(f"error: {report.stopped} ({submitted})", 2)
        if report.bad_lines:
            raise exit_with(f"{report.bad_lines} line(s) rejected; {submitted}", 1)
        return
    if wait is not None and wait <= 0:
        raise typer.BadParameter("--wait must be more than 0 seconds")
    if prompt == "-":
        prompt = sys.stdin.read()
    task: dict[str, Any] = {
        "messages": messages,
        "system": system,
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "type": task_type,
        "id": task_id,
        "cache": cache,
        "ttl": ttl,
        "metadata": metadata,
    }
    with _producer_tracing():
        new_id, result = run_async(_submit_one(settings, prompt, task, wait))
    if wait is None:
        typer.echo(new_id)
    elif result is None:
        raise exit_with(f"submitted {new_id}; no result within {wait:g}s", 1)
    else:
        _show_result(new_id, result, as_json)


def _producer_tracing() -> contextlib.AbstractContextManager[None]:
    """`send` spans for what `submit` adds, when the OTEL_* variables ask for traces."""
    import os

    from observability import producer_tracing

    return producer_tracing(os.environ)


async def _submit_file(settings: Settings, path: Path, out_file: Path | None) -> render.FileReport:
    """Submit a JSONL file in batches, with a progress bar and per-line rejections."""
    from pipeline.client import Client

    try:
        total = sum(1 for _ in path.open("rb"))
        lines = path.open(encoding="utf-8")
        ids_out = out_file.open("w", encoding="utf-8") if out_file else None
    except OSError as exc:
        raise exit_with(f"error: {exc.filename}: {exc.strerror or exc}", 2) from None
    with lines, ids_out or contextlib.nullcontext():
        async with Client.from_settings(settings) as client:
            return await render.submit_lines(client, lines, total, ids_out, err)


async def _submit_one(
    settings: Settings, prompt: str | None, task: dict[str, Any], wait: float | None
) -> tuple[str, dict[str, str] | None]:
    from pipeline.client import Client

    async with Client.from_settings(settings) as client:
        new_id = await client.submit(prompt, **task)
        return new_id, (await client.result(new_id, wait=wait) if wait else None)


@app.command()
def result(
    task_id: Annotated[str, typer.Argument(help="The task id that submit printed.")],
    wait: Annotated[
        float | None, typer.Option(help="Wait up to SECONDS for the task to finish.")
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Show a task's result (exit 1 if there is none: unknown, unfinished or expired)."""
    from pipeline.client import Client

    async def fetch() -> dict[str, str] | None:
        async with Client.from_settings(settings_from(config)) as client:
            return await client.result(task_id, wait=wait)

    found = run_async(fetch())
    if found is None:
        waited = f" after waiting {wait:g}s" if wait else ""
        raise exit_with(
            f"no result for task {task_id!r}{waited} (unknown, unfinished or expired)", 1
        )
    _show_result(task_id, found, as_json)


def _show_result(task_id: str, found: dict[str, str], as_json: bool) -> None:
    if as_json:
        out.print_json(data={"id": task_id, **found})
    else:
        out.print(render.result_view(task_id, found))


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
