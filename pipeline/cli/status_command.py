"""`pipeline status` (and `--watch`): the queues, pauses, limits and Redis's durability.

Registered on `pipeline.cli.main.app`; `pipeline.cli.status` gathers the numbers and
`pipeline.cli.render` draws them.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from pipeline.claude.settings import Settings
from pipeline.cli import render
from pipeline.cli.common import (
    AppOpt,
    ConfigOpt,
    JsonOpt,
    connection,
    out,
    run_async,
    settings_from,
)

if TYPE_CHECKING:
    from pipeline.cli.status import PipelineStatus
    from pipeline.cli.watch import WatchView
    from pipeline.runtime.stage import App

__all__ = ["status"]


def status(
    app_spec: AppOpt = "stages:app",
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
    """Backlog, pending, lag and retries per stage; DLQ; pauses; Redis's durability.

    Per stage: backlog, pending, lag, consumers, oldest pending age and retries waiting; the
    DLQ; paused stages; the shared rate limits; Redis's eviction policy and persistence, with
    what in them may lose data."""
    import msgspec

    from pipeline.cli.status import gather
    from pipeline.cli.worker import load_app
    from pipeline.runtime.redis_conn import redacted

    settings = settings_from(config)
    the_app = load_app(app_spec, settings)
    if watch:
        _watch_status(settings, the_app, interval, iterations)
        return

    async def gather_all() -> PipelineStatus:
        async with connection(settings) as (redis, keys):
            return await gather(redis, keys, the_app, settings.ratelimit, durability=True)

    state = run_async(gather_all())
    if as_json:
        out.print_json(msgspec.json.encode(state).decode())
    else:
        where = f"{redacted(settings.redis.url)}  prefix {settings.prefix}"
        out.print(render.status_view(state, where))


def _watch_status(settings: Settings, the_app: App, interval_s: float, iterations: int) -> None:
    """A live view on a terminal (one frame per refresh when piped); Ctrl-C exits with 0."""
    from rich.live import Live

    from pipeline.cli.watch import run_watch
    from pipeline.runtime.redis_conn import redacted

    where = f"{redacted(settings.redis.url)}  prefix {settings.prefix}"

    async def run(show: Callable[[WatchView], None]) -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):  # end between polls, never mid-command
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        async with connection(settings) as (redis, keys):
            await run_watch(redis, keys, the_app, settings, show,
                            interval_s=interval_s, iterations=iterations, stop=stop)  # fmt: skip

    try:
        if out.is_terminal:
            with Live(console=out, auto_refresh=False, transient=False) as live:
                run_async(run(lambda v: live.update(render.watch_view(v, where), refresh=True)))
        else:
            run_async(run(lambda v: out.print(render.watch_view(v, where))))
    except KeyboardInterrupt:
        pass
