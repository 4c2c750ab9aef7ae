"""`pipeline dlq …`: inspect, replay and purge dead letters (registered on `pipeline.cli.app`).

Exit codes: 0 done; 1 an id was not in the DLQ, or a confirmation was declined; 2 bad ids, or
replay/purge without --yes when stdin is not a terminal (a script cannot answer the prompt).

With partitions a DLQ id names its partition, `p3/1718000000000-0` (as `dlq list` prints it);
a bare entry id is looked for in every partition's DLQ, and refused (2) if several have it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer

from pipeline.claude.settings import Settings
from pipeline.cli import render
from pipeline.cli.common import (
    ConfigOpt,
    JsonOpt,
    connection,
    err,
    out,
    run_async,
    settings_from,
)
from pipeline.cli.exits import Code, fail
from pipeline.cli.json_out import dead_letter_json
from pipeline.runtime.dlq import DLQ_ID, DeadLetter, DeadLetters, DlqIdError

_T = TypeVar("_T")

dlq_app = typer.Typer(
    help="Inspect, replay and purge dead letters (tasks that could not be completed).",
    no_args_is_help=True,
)
YesOpt = Annotated[
    bool,
    typer.Option("--yes", "-y", help="Do not ask for confirmation (needed off a terminal)."),
]
#: How many letters `dlq show TASK_ID` reads at a time, newest first, looking for the task.
_PAGE = 500


def _dlq_ids(ids: list[str] | None, all_entries: bool) -> list[str] | None:
    """The ids given, or None for --all; exactly one of the two."""
    if bool(ids) == all_entries:
        raise typer.BadParameter("give DLQ ids or --all (not both)")
    for dlq_id in ids or ():
        if not DLQ_ID.fullmatch(dlq_id):
            raise typer.BadParameter(
                f"{dlq_id!r} is not a DLQ id (like 1718000000000-0, or p3/1718000000000-0 "
                "with partitions)"
            )
    return None if all_entries else list(ids or ())


def _confirm(command: str, question: str, yes: bool) -> None:
    """Ask on a terminal; off one (a script, a pipe) only --yes goes ahead."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise fail(f"dlq {command} asks for confirmation and stdin is not a terminal",
                   Code.USAGE, label="usage", hint="pass --yes")  # fmt: skip
    if not typer.confirm(question, err=True):
        raise fail(f"nothing done: dlq {command} was not confirmed", Code.FAILED)


@dlq_app.command("list")
def dlq_list(
    count: Annotated[
        int, typer.Option("--count", "-n", min=1, help="How many, newest first.")
    ] = 20,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """List dead letters, newest first: DLQ id, stage, age, task id, and the error (shortened)."""
    letters = run_async(_dead_letters(settings_from(config), lambda d: d.list(count=count)))
    if as_json:
        now_ms = int(time.time() * 1000)
        out.print_json(data=[dead_letter_json(letter, now_ms) for letter in letters])
    else:
        out.print(render.dlq_table(letters))


@dlq_app.command("show")
def dlq_show(
    wanted: Annotated[
        str,
        typer.Argument(
            metavar="ID", help="A DLQ entry id (from dlq list) or a task id (its newest letter)."
        ),
    ],
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Show one dead letter in full, with the task's original fields pretty-printed."""
    letter, letters = run_async(_find(settings_from(config), wanted))
    if letter is None:
        raise fail(f"no DLQ entry and no dead letter of a task {wanted!r}", Code.FAILED,
                   hint="pipeline dlq list shows what is there")  # fmt: skip
    if as_json:
        data = dead_letter_json(letter, int(time.time() * 1000), full=True)
        out.print_json(data={**data, "letters_of_task": letters})
        return
    out.print(render.dead_letter_view(letter))
    if letters > 1:
        err.print(f"{letters} dead letters of task {letter.task_id}: the newest is shown",
                  markup=False, highlight=False)  # fmt: skip


async def _find(settings: Settings, wanted: str) -> tuple[DeadLetter | None, int]:
    """The letter with DLQ id `wanted`, else the newest letter of the task `wanted` (and how
    many letters that task has)."""

    async def find(dead: DeadLetters) -> tuple[DeadLetter | None, int]:
        if DLQ_ID.fullmatch(wanted):
            letter = await dead.get(wanted)
            if letter is not None:
                return letter, 1
        return await dead.of_task(wanted, page=_PAGE)

    return await _dead_letters(settings, find)


@dlq_app.command("replay")
def dlq_replay(
    dlq_ids: Annotated[list[str] | None, typer.Argument(help="DLQ entry ids to replay.")] = None,
    all_entries: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    yes: YesOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Send dead letters back to the ingress as fresh tasks (their failed result is removed)."""
    ids = _dlq_ids(dlq_ids, all_entries)
    settings = settings_from(config)
    what = "every dead letter" if ids is None else f"{len(ids)} dead letter(s)"
    _confirm("replay", f"Replay {what} to the ingress?", yes)

    async def replay(dead: DeadLetters) -> tuple[list[str], list[str]]:
        if ids is None:
            every = await dead.list(count=max(1, await dead.size()), newest_first=False)
            wanted = [letter.dlq_id for letter in every]
        else:
            wanted = ids
        done = await dead.replay(wanted)
        return done, sorted(set(wanted) - set(done))

    done, missing = run_async(_dead_letters(settings, replay))
    typer.echo(f"replayed {len(done)} dead letter(s)")
    if missing:
        raise fail(f"not found: {' '.join(missing)}", Code.FAILED)


@dlq_app.command("purge")
def dlq_purge(
    dlq_ids: Annotated[list[str] | None, typer.Argument(help="DLQ entry ids to delete.")] = None,
    all_entries: Annotated[bool, typer.Option("--all", help="Delete the whole DLQ.")] = False,
    yes: YesOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Delete dead letters for good."""
    ids = _dlq_ids(dlq_ids, all_entries)
    settings = settings_from(config)
    what = "the whole DLQ" if ids is None else f"{len(ids)} dead letter(s)"
    _confirm("purge", f"Delete {what}? This cannot be undone", yes)
    purged = run_async(_dead_letters(settings, lambda d: d.purge(ids)))
    typer.echo(f"purged {purged} dead letter(s)")
    if ids is not None and purged < len(ids):
        raise fail(f"{len(ids) - purged} of the ids were not in the DLQ", Code.FAILED)


async def _dead_letters(settings: Settings, action: Callable[[DeadLetters], Awaitable[_T]]) -> _T:
    """Run one DLQ operation on a connection of its own (every partition's DLQ)."""
    async with connection(settings) as (redis, keys):
        try:
            return await action(DeadLetters(redis, keys, settings.results.live_ttl_s))
        except DlqIdError as exc:
            raise fail(str(exc), Code.USAGE, label="dlq id",
                       hint="pipeline dlq list shows the ids") from None  # fmt: skip


__all__ = ["dlq_app"]
