"""`pipeline submit` and `pipeline result`: put tasks in (one, or a JSONL file in batches
under a progress bar) and read their results. Registered on `pipeline.cli.main.app`.

The `Client` is imported when a command runs, not when the `pipeline` command starts.
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
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from pipeline.claude.settings import Settings
from pipeline.cli import render
from pipeline.cli.common import ConfigOpt, JsonOpt, err, exit_with, out, run_async, settings_from
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


async def _submit_file(settings: Settings, path: Path, out_file: Path | None) -> FileReport:
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
            return await submit_lines(client, lines, total, ids_out, err)


async def _submit_one(
    settings: Settings, prompt: str | None, task: dict[str, Any], wait: float | None
) -> tuple[str, dict[str, str] | None]:
    from pipeline.client import Client

    async with Client.from_settings(settings) as client:
        new_id = await client.submit(prompt, **task)
        return new_id, (await client.result(new_id, wait=wait) if wait else None)


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


@dataclass
class FileReport:
    """What `submit --file` did: ids in file order, lines rejected, why it stopped early."""

    ids: list[str] = field(default_factory=list)
    bad_lines: int = 0
    stopped: str | None = None


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
    return report
