"""`pipeline dlq …`: inspect, replay and purge dead letters (registered on `pipeline.cli.app`)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer

from pipeline.claude.settings import Settings
from pipeline.cli import render
from pipeline.cli.common import ConfigOpt, connection, exit_with, out, run_async, settings_from
from pipeline.runtime.dlq import DeadLetters

_T = TypeVar("_T")

dlq_app = typer.Typer(
    help="Inspect, replay and purge dead letters (tasks that could not be completed).",
    no_args_is_help=True,
)
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
_DLQ_ID = re.compile(r"\d+(-\d+)?")


def _dlq_ids(ids: list[str] | None, all_entries: bool) -> list[str] | None:
    """The ids given, or None for --all; exactly one of the two."""
    if bool(ids) == all_entries:
        raise typer.BadParameter("give DLQ ids or --all (not both)")
    for dlq_id in ids or ():
        if not _DLQ_ID.fullmatch(dlq_id):
            raise typer.BadParameter(f"{dlq_id!r} is not a DLQ id (like 1718000000000-0)")
    return None if all_entries else list(ids or ())


@dlq_app.command("list")
def dlq_list(
    count: Annotated[
        int, typer.Option("--count", "-n", min=1, help="How many, newest first.")
    ] = 20,
    config: ConfigOpt = None,
) -> None:
    """List dead letters: id, task, stage, error (shortened), deliveries, attempts, age."""
    letters = run_async(_dead_letters(settings_from(config), lambda d: d.list(count=count)))
    out.print(render.dlq_table(letters))


@dlq_app.command("show")
def dlq_show(
    dlq_id: Annotated[str, typer.Argument(help="The DLQ entry id (from dlq list).")],
    config: ConfigOpt = None,
) -> None:
    """Show one dead letter in full, with the task's original fields pretty-printed."""
    _dlq_ids([dlq_id], False)
    letter = run_async(_dead_letters(settings_from(config), lambda d: d.get(dlq_id)))
    if letter is None:
        raise exit_with(f"no DLQ entry {dlq_id}", 1)
    out.print(render.dead_letter_view(letter))


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
    if not yes:
        what = "every dead letter" if ids is None else f"{len(ids)} dead letter(s)"
        typer.confirm(f"Replay {what} to the ingress?", abort=True)

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
        raise exit_with(f"not found: {' '.join(missing)}", 1)


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
    if not yes:
        what = "the whole DLQ" if ids is None else f"{len(ids)} dead letter(s)"
        typer.confirm(f"Delete {what}? This cannot be undone", abort=True)
    purged = run_async(_dead_letters(settings, lambda d: d.purge(ids)))
    typer.echo(f"purged {purged} dead letter(s)")
    if ids is not None and purged < len(ids):
        raise exit_with(f"{len(ids) - purged} of the ids were not in the DLQ", 1)


async def _dead_letters(settings: Settings, action: Callable[[DeadLetters], Awaitable[_T]]) -> _T:
    """Run one DLQ operation on a connection of its own."""
    from pipeline.runtime.keys import Keys

    async with connection(settings) as redis:
        return await action(DeadLetters(redis, Keys(settings.prefix), settings.results.live_ttl_s))


__all__ = ["dlq_app"]
