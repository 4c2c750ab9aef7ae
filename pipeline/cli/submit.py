"""`pipeline submit` and `pipeline result`: put tasks in (one, or a JSONL file in batches
under a progress bar) and read their results. Registered on `pipeline.cli.main.app`.

Exit codes: 0 completed; 1 the task failed (its result is still printed), or lines of a
file were rejected; 3 no result within --wait (or none yet, without it), with the reason when
Redis shows one (`pipeline.cli.diagnose`); 4 the ingress is full. The `Client` is imported
when a command runs, not when the `pipeline` command starts.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer
from redis.exceptions import RedisError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from pipeline.claude.request import WIRE_FIELDS
from pipeline.claude.settings import Settings
from pipeline.cli import render
from pipeline.cli.common import AppOpt, ConfigOpt, JsonOpt, err, out, run_async, settings_from
from pipeline.cli.exits import Code, fail
from pipeline.cli.json_out import result_json
from pipeline.runtime.errors import Backpressure, InvalidTask

if TYPE_CHECKING:
    from pipeline.client import Client

__all__ = ["FileReport", "result", "submit", "submit_lines"]


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
        str,
        typer.Option(
            help="auto (the router decides), a family of [claude.models] (haiku, sonnet, "
            "opus by default), or a model id."
        ),
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
    tools: Annotated[
        str | None,
        typer.Option(help="Tool definitions: a JSON array, or @FILE holding one."),
    ] = None,
    stop: Annotated[
        list[str] | None,
        typer.Option("--stop", help="A stop sequence (repeatable)."),
    ] = None,
    thinking_budget: Annotated[
        int | None,
        typer.Option(help="Extended thinking with this budget of tokens (at least 1024)."),
    ] = None,
    extra_fields: Annotated[
        list[str] | None,
        typer.Option(
            "--field",
            help='Any other wire field as NAME=VALUE, e.g. tool_choice=\'{"type":"any"}\', '
            "top_k=40 or params=@params.json (repeatable; @FILE reads the value from a file).",
        ),
    ] = None,
    wait: Annotated[
        float | None,
        typer.Option(
            help="Wait up to SECONDS for the result and print it instead of the id "
            "(exit 1 if the task failed, 3 if no result came in time)."
        ),
    ] = None,
    as_json: JsonOpt = False,
    app_spec: AppOpt = "stages:app",
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
            code, label = report.stopped_code, report.stopped_label
            raise fail(f"{report.stopped} ({submitted})", code, label=label)
        if report.bad_lines:
            raise fail(f"{report.bad_lines} line(s) rejected; {submitted}", Code.FAILED)
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
        "tools": _value("tools", tools),
        "stop_sequences": json.dumps(stop) if stop else None,
        "thinking": (
            json.dumps({"type": "enabled", "budget_tokens": thinking_budget})
            if thinking_budget is not None
            else None
        ),
    }
    for item in extra_fields or []:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise typer.BadParameter(f"--field {item!r}: give NAME=VALUE")
        if name not in WIRE_FIELDS:
            raise typer.BadParameter(f"--field {name}: not a field of the wire format")
        if task.get(name) is not None or name == "prompt":
            raise typer.BadParameter(f"--field {name}: given twice (it has an option of its own)")
        task[name] = _value(name, value)
    with _producer_tracing():
        new_id, result, why = run_async(_submit_one(settings, prompt, task, wait, app_spec))
    if wait is None:
        typer.echo(new_id)
    elif result is None:
        raise _no_result(f"submitted {new_id}; no result within {wait:g}s", why)
    else:
        _show_result(new_id, result, as_json)


def _value(name: str, value: str | None) -> str | None:
    """A field's value as given, or read from the file it names as `@FILE`."""
    if value is None or not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).read_text(encoding="utf-8")
    except OSError as exc:
        raise fail(
            f"{name}: {value[1:]}: {exc.strerror or exc}", Code.USAGE, label="file"
        ) from None


def _producer_tracing() -> contextlib.AbstractContextManager[None]:
    """`send` spans for what `submit` adds, when the OTEL_* variables ask for traces."""
    import os

    from observability import producer_tracing

    return producer_tracing(os.environ)


async def _submit_file(settings: Settings, path: Path, out_file: Path | None) -> FileReport:
    """Submit a JSONL file in batches, with a progress bar and per-line rejections."""
    from pipeline.client import Client

    try:
        total = sum(1 for _ in path.open("rb"))
        lines = path.open(encoding="utf-8")
        ids_out = out_file.open("w", encoding="utf-8") if out_file else None
    except OSError as exc:
        raise fail(f"{exc.filename}: {exc.strerror or exc}", Code.USAGE, label="file") from None
    with lines, ids_out or contextlib.nullcontext():
        async with Client.from_settings(settings) as client:
            return await submit_lines(client, lines, total, ids_out, err)


async def _submit_one(
    settings: Settings, prompt: str | None, task: dict[str, Any], wait: float | None, app: str
) -> tuple[str, dict[str, str] | None, str | None]:
    """The new id, its result (with `wait`), and why there is none when Redis tells."""
    from pipeline.client import Client

    async with Client.from_settings(settings) as client:
        new_id = await client.submit(prompt, **task)
        if not wait:
            return new_id, None, None
        found = await client.result(new_id, wait=wait)
        return new_id, found, None if found else await _why(client, settings, app)


def result(
    task_id: Annotated[str, typer.Argument(help="The task id that submit printed.")],
    wait: Annotated[
        float | None, typer.Option(help="Wait up to SECONDS for the task to finish.")
    ] = None,
    as_json: JsonOpt = False,
    app_spec: AppOpt = "stages:app",
    config: ConfigOpt = None,
) -> None:
    """Show a task's result: exit 0 completed, 1 failed, 3 no result.

    No result: none yet (the task is unfinished, unknown or expired), or none within --wait."""
    from pipeline.client import Client

    settings = settings_from(config)

    async def fetch() -> tuple[dict[str, str] | None, str | None]:
        async with Client.from_settings(settings) as client:
            found = await client.result(task_id, wait=wait)
            if found is None and wait:
                return None, await _why(client, settings, app_spec)
            return found, None

    found, why = run_async(fetch())
    if found is None:
        if wait:
            raise _no_result(f"no result for task {task_id!r} within {wait:g}s", why)
        raise fail(f"no result for task {task_id!r} yet (unfinished, unknown or expired)",
                   Code.TIMEOUT, hint="--wait SECONDS waits for it")  # fmt: skip
    _show_result(task_id, found, as_json)


async def _why(client: Client, settings: Settings, app_spec: str) -> str | None:
    """Why nothing finishes, if Redis shows it (best effort: never fails the command)."""
    from pipeline.cli.diagnose import why_no_result
    from pipeline.cli.worker import load_app
    from pipeline.runtime.errors import PipelineError

    try:
        the_app = load_app(app_spec, settings)
        return await why_no_result(client.redis, client.keys, the_app, settings)
    except (PipelineError, RedisError):
        return None


def _no_result(message: str, why: str | None) -> Exception:
    if why:
        return fail(f"{message}: {why}", Code.TIMEOUT)
    busy = "the workers may be busy: pipeline status shows the queues"
    return fail(message, Code.TIMEOUT, hint=busy)


def _show_result(task_id: str, found: dict[str, str], as_json: bool) -> None:
    """Print the result; a failed task ends the command with exit 1 (after printing)."""
    if as_json:
        out.print_json(data=result_json(task_id, found))
    else:
        out.print(render.result_view(task_id, found))
    if found.get("status") != "completed":
        raise typer.Exit(Code.FAILED)


@dataclass
class FileReport:
    """What `submit --file` did: ids in file order, lines rejected, why it stopped early."""

    ids: list[str] = field(default_factory=list)
    bad_lines: int = 0
    stopped: str | None = None
    stopped_code: int = Code.UNAVAILABLE  # the ingress full; a file that is not text: 2
    stopped_label: str | None = "ingress full"


async def submit_lines(
    client: Client, lines: Iterable[str], total: int, ids_out: TextIO | None, console: Console
) -> FileReport:
    """Submit JSONL tasks in `submit_many` batches under a progress bar.

    A bad line is reported with its number and skipped; a full ingress stops the run (the ids
    submitted so far are kept and written).
    """
    from pipeline.client import BATCH_SIZE, task_fields

    report = FileReport()
    batch: list[dict[str, object]] = []
    first_line = 1  # of the batch being collected
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(
        *columns,
        console=console,
        redirect_stdout=False,
        redirect_stderr=False,
        disable=not console.is_terminal,  # a bar in a log file or pipe is noise
    ) as bar:
        progress = bar.add_task("submitting", total=total)

        async def flush() -> None:
            new = await client.submit_many(batch)
            report.ids.extend(new)
            if ids_out is not None:
                ids_out.write("".join(f"{i}\n" for i in new))
                ids_out.flush()
            bar.advance(progress, len(batch))
            batch.clear()

        try:
            for number, line in enumerate(lines, 1):
                if not batch:
                    first_line = number
                if not line.strip():
                    bar.advance(progress)
                    continue
                try:
                    task = json.loads(line)
                    if not isinstance(task, dict):
                        raise InvalidTask("a line must be a JSON object")
                    task_fields(task, client.settings)
                except (ValueError, InvalidTask) as exc:  # JSONDecodeError is a ValueError
                    report.bad_lines += 1
                    bar.console.print(Text(f"line {number}: {exc}", style="red"), highlight=False)
                    bar.advance(progress)
                    continue
                batch.append(task)
                if len(batch) >= BATCH_SIZE:
                    await flush()
            if batch:
                await flush()
        except Backpressure as exc:
            report.stopped = f"stopped at line {first_line}: {exc}"
        except UnicodeDecodeError as exc:
            report.stopped = f"the file is not UTF-8 text ({exc.reason}, near line {first_line})"
            report.stopped_code, report.stopped_label = Code.USAGE, "file"
    return report
