"""`pipeline batches …`: the batch lane's queued tasks and open batches; cancel one.

Exit codes: 0 done; 1 no such batch, or a cancel not confirmed; 2 usage (cancel off a terminal
without --yes); 4 Redis or the API unreachable.
"""

from __future__ import annotations

import sys
from typing import Annotated

import msgspec
import typer

from pipeline.claude.batch_status import BatchView, LaneView, batch_view, lane_views
from pipeline.claude.settings import Settings
from pipeline.cli import render
from pipeline.cli.common import ConfigOpt, JsonOpt, connection, out, run_async, settings_from
from pipeline.cli.exits import Code, fail

__all__ = ["batches_app"]

batches_app = typer.Typer(
    help="The batch lane (Message Batches, half price): queued tasks and open batches.",
    no_args_is_help=True,
)


@batches_app.command("list")
def batches_list(as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Per model family: tasks waiting for a batch, and every open batch.

    Each batch with its state, API id, requests, those still to hand on, and age."""
    lanes = run_async(_lanes(settings_from(config)))
    if as_json:
        out.print_json(msgspec.json.encode(lanes).decode())
    else:
        out.print(render.batches_table(lanes))


@batches_app.command("show")
def batches_show(
    wanted: Annotated[str, typer.Argument(metavar="BATCH", help="A batch token or API id.")],
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """One open batch."""
    found = run_async(_find(settings_from(config), wanted))
    if found is None:
        raise fail(f"no open batch {wanted!r}", Code.FAILED,
                   hint="pipeline batches list shows the open ones")  # fmt: skip
    if as_json:
        out.print_json(msgspec.json.encode(found).decode())
    else:
        lane = LaneView(family=found.family, queued=0, oldest_queued_s=None, batches=[found])
        out.print(render.batches_table([lane]))


@batches_app.command("cancel")
def batches_cancel(
    wanted: Annotated[str, typer.Argument(metavar="BATCH", help="A batch token or API id.")],
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask (needed off a terminal).")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Cancel a sent batch at the API.

    Requests it has not answered yet come back canceled and are answered on the standard
    lane, at full price."""
    settings = settings_from(config)
    found = run_async(_find(settings, wanted))
    if found is None or not found.batch_id:
        raise fail(f"no sent batch {wanted!r}", Code.FAILED,
                   hint="pipeline batches list shows the open ones")  # fmt: skip
    if not yes:
        if not sys.stdin.isatty():
            raise fail("batches cancel asks for confirmation and stdin is not a terminal",
                       Code.USAGE, label="usage", hint="pass --yes")  # fmt: skip
        if not typer.confirm(f"Cancel batch {found.batch_id} ({found.unanswered} unanswered)?",
                             err=True):  # fmt: skip
            raise fail("nothing done: batches cancel was not confirmed", Code.FAILED)
    run_async(_cancel(settings, found.batch_id))
    typer.echo(f"cancel requested for {found.batch_id}")


async def _lanes(settings: Settings) -> list[LaneView]:
    async with connection(settings) as (redis, keys):
        return await lane_views(redis, keys, settings.claude.models)


async def _find(settings: Settings, wanted: str) -> BatchView | None:
    async with connection(settings) as (redis, keys):
        found = await batch_view(redis, keys, wanted)
        if found is not None:
            return found
        for lane in await lane_views(redis, keys, settings.claude.models):
            for batch in lane.batches:
                if batch.batch_id == wanted:
                    return batch
    return None


async def _cancel(settings: Settings, batch_id: str) -> None:
    from pipeline.claude import batch_api, make_batch_client
    from pipeline.runtime.errors import PipelineError

    client = make_batch_client(settings.claude)
    try:
        await batch_api.cancel(client, batch_id, settings.claude.auth_pause_s)
    except PipelineError as exc:
        raise fail(str(exc), Code.UNAVAILABLE, label="claude") from None
    finally:
        await client.close()
