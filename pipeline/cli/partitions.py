"""`pipeline partitions …`: the layout the deployment's streams are in, and changing it.

Workers refuse a partition count other than the recorded one (`check_layout`), so tasks are
never left in a layout nobody reads. Changing it is for a drained pipeline with no worker
running: nothing queued, in flight, waiting to retry, to be moved or to be published.

Exit codes: 0 done; 1 not drained (what is left is listed); 2 usage; 4 Redis unreachable.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import typer
from redis.asyncio import Redis

from pipeline.claude.settings import Settings
from pipeline.cli.common import (
    AppOpt,
    ConfigOpt,
    JsonOpt,
    connection,
    out,
    run_async,
    settings_from,
)
from pipeline.cli.exits import Code, fail
from pipeline.runtime.keys import Keys
from pipeline.runtime.stage import App

__all__ = ["partitions_app"]

partitions_app = typer.Typer(
    help="The partitions the streams are laid out in: show, or change once drained.",
    no_args_is_help=True,
)


class Layout(msgspec.Struct, frozen=True, kw_only=True):
    partitions: int  # the recorded count (0: none), or the configured one if none recorded
    recorded: bool  # a worker has recorded it
    left: list[str]  # what still lies in that layout (empty: drained)


@partitions_app.command("show")
def partitions_show(
    as_json: JsonOpt = False, app_spec: AppOpt = "stages:app", config: ConfigOpt = None
) -> None:
    """The recorded partition count, and what still lies in that layout."""
    layout = run_async(_layout(settings_from(config), app_spec))
    if as_json:
        out.print_json(msgspec.json.encode(layout).decode())
        return
    count = f"{layout.partitions} partitions" if layout.partitions else "no partitions"
    origin = "recorded by the first worker" if layout.recorded else "configured; no worker yet"
    out.print(f"{count} ({origin})")
    out.print("drained" if not layout.left else "not drained: " + "; ".join(layout.left))


@partitions_app.command("set")
def partitions_set(
    count: Annotated[int, typer.Argument(min=0, max=4096, help="Partitions (0: none).")],
    app_spec: AppOpt = "stages:app",
    config: ConfigOpt = None,
) -> None:
    """Lay the streams out in COUNT partitions from now on.

    Only once drained: no worker running and nothing queued, in flight, waiting to retry,
    to be moved or to be published in the old layout. Then set redis.partitions to COUNT
    for every process and start the workers."""
    settings = settings_from(config)
    layout = run_async(_layout(settings, app_spec))
    if layout.left:
        hint = "stop the producers, let the workers finish, stop them, try again"
        raise fail("the pipeline is not drained: " + "; ".join(layout.left), Code.FAILED,
                   hint=hint)  # fmt: skip
    run_async(_record(settings, count))
    out.print(f"laid out in {count} partitions from now on; set redis.partitions = {count}")


async def _layout(settings: Settings, app_spec: str) -> Layout:
    from pipeline.cli.worker import load_app

    app = load_app(app_spec, settings)
    # The recorded layout, whatever this process is configured with.
    unchecked = msgspec.structs.replace(settings, redis=msgspec.structs.replace(
        settings.redis, partitions=None))  # fmt: skip
    async with connection(unchecked, check_layout=False) as (redis, keys):
        recorded = await redis.get(keys.layout)
        count = int(recorded) if recorded is not None else keys.partitions
        if settings.redis.partitions is not None and recorded is None:
            count = settings.redis.partitions
        layout = Keys(keys.prefix, partitions=count)
        left = await _left(redis, layout, app)
    return Layout(partitions=count, recorded=recorded is not None, left=left)


async def _left(redis: Redis, keys: Keys, app: App) -> list[str]:
    """What still lies in `keys`' layout, in words (empty: drained)."""
    from pipeline.runtime.status import gather_status

    status = await gather_status(redis, keys, app)
    left = []
    for stream in status.streams:
        for name, count in (("queued", stream.backlog), ("in flight", stream.pending),
                            ("waiting to retry", stream.delayed)):  # fmt: skip
            if count:
                where = f"{stream.stage}[{stream.lane}]" if stream.lane else stream.stage
                left.append(f"{count} {name} in {where}")
    if status.unmoved:
        left.append(f"{status.unmoved} not yet moved from {keys.ingress}")
    if status.unpublished:
        left.append(f"{status.unpublished} results not yet published")
    for held in status.held:
        if sum(held.tasks.values()):
            left.append(f"{sum(held.tasks.values())} held by {held.stage}")
    workers = [key async for key in redis.scan_iter(match=keys.worker("*"), count=1000)]
    if workers:
        left.append(f"{len(workers)} worker(s) running")
    return left


async def _record(settings: Settings, count: int) -> None:
    async with connection(settings, check_layout=False) as (redis, keys):
        await redis.set(keys.layout, count)
