"""The `pipeline` command: the typer app, its `worker` and `fake-claude` commands, and the
other modules' commands registered on it in `--help` order.

Exit codes (`pipeline.cli.exits.Code`, docs/CLI.md): 0 done; 1 the task failed, or what was
asked for is not there; 2 usage or configuration; 3 no result in time; 4 Redis unreachable
or the ingress full (try again later); 130 interrupted. Every failure is one line on stderr.
"""

from __future__ import annotations

import inspect
import os
import re
from typing import Annotated

import typer

from pipeline.cli.batches import batches_app
from pipeline.cli.common import ConfigOpt, run_async, settings_from, setup_logging
from pipeline.cli.cost import cost
from pipeline.cli.deploy_plan import keda_triggers
from pipeline.cli.dlq import dlq_app
from pipeline.cli.exits import Code, OneLineErrors, fail
from pipeline.cli.partitions import partitions_app
from pipeline.cli.status_command import status
from pipeline.cli.submit import result, submit

app = typer.Typer(
    cls=OneLineErrors,
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
    partitions: Annotated[
        str | None,
        typer.Option(
            "--partitions",
            help="Only these partitions of a partitioned deployment, e.g. 0-3,8 "
            "(docs/CLUSTER.md; default: all).",
        ),
    ] = None,
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
    known_stages = {s.name for s in the_app.stages}
    for name in names:
        if name not in known_stages:
            choices = ", ".join(s.name for s in the_app.stages)
            raise fail(f"no stage {name!r} (stages: {choices})", Code.USAGE, label="--stage")
    known = {ln for name in names for ln in the_app.stage(name).lanes}
    for wanted in lane:
        if wanted not in known:
            choices = ", ".join(sorted(known)) or "none: no laned stage selected"
            raise fail(f"no lane {wanted!r} (lanes: {choices})", Code.USAGE, label="--lane")
    run_async(
        run_worker(
            the_app,
            names,
            settings,
            lanes=lane,
            partitions=_partition_list(partitions),
            concurrency=concurrency,
            consumer=consumer,
            metrics_port=metrics_port,
        )
    )


def _partition_list(text: str | None) -> list[int]:
    """`0-3,8` -> [0, 1, 2, 3, 8]."""
    found: list[int] = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        first, _, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise fail(f"{part.strip()!r} is not a partition or a range like 0-3", Code.USAGE,
                       label="--partitions") from None  # fmt: skip
        found += range(low, high + 1)
    return found


# ---- producing and reading results: pipeline.cli.submit --------------------------------------

app.command()(submit)
app.command()(result)


# ---- operating: pipeline.cli.status_command ---------------------------------------------------

app.command()(status)


# ---- the fake Claude API --------------------------------------------------------------------


#: The `FakeClaudeConfig` field each `fake-claude` option sets, where its name is not the
#: option's: the config's errors name fields, the command's name options.
_FAKE_FLAGS = {"server_error_rate": "--error-rate", "bad_keys": "--bad-key",
               "forbidden_keys": "--forbidden-key"}  # fmt: skip


def _as_flags(message: str, fields: list[str]) -> str:
    """`message` with every field of `fields` it names written as its `fake-claude` option."""
    for name in fields:
        flag = _FAKE_FLAGS.get(name, "--" + name.replace("_", "-"))
        message = re.sub(rf"(?<![\w-]){name}(?![\w-])", flag, message)
    return message


@app.command("fake-claude")
def fake_claude(
    ctx: typer.Context,
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
        raise fail(_as_flags(str(exc), list(values)), Code.USAGE, label="usage",
                   hint=f"see {ctx.command_path} --help") from None  # fmt: skip
    try:
        run_forever(fake)
    except OSError as exc:  # the address is taken, or not ours to listen on
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise fail(f"cannot listen on {host}:{port}: {why}", Code.USAGE, label="port",
                   hint="pass another --port, or --port 0 for any free one") from None  # fmt: skip


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
    if report.dead_worker or report.failed or report.completed < report.submitted:
        raise typer.Exit(Code.FAILED)


app.add_typer(dlq_app, name="dlq")
app.add_typer(batches_app, name="batches")
app.add_typer(partitions_app, name="partitions")
app.command()(cost)


# ---- deploying: pipeline.cli.deploy_plan ------------------------------------------------------

app.command("keda-triggers")(keda_triggers)


def _unwrapped_help(typer_app: typer.Typer) -> None:
    """Each command's help is its docstring with the line breaks inside a paragraph taken
    out, so that `--help` wraps it to the terminal: typer keeps them, and a paragraph wrapped
    at 92 columns in the source broke mid-sentence at 80 (`… the` / `DLQ; …`)."""
    for info in typer_app.registered_commands:
        if info.help is None and info.callback is not None and info.callback.__doc__:
            paragraphs = inspect.cleandoc(info.callback.__doc__).split("\n\n")
            info.help = "\n\n".join(" ".join(p.split()) for p in paragraphs)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _unwrapped_help(group.typer_instance)


_unwrapped_help(app)


def main() -> None:
    """Entry point (`pipeline`): the app's group turns expected failures into one line."""
    app()
