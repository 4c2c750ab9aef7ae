"""Durable delayed retries: entries wait in a sorted set in Redis, not in a worker's sleep.

The "Retries are durable" guarantee. Every worker of a stage runs the mover; `promote.lua` moves
each due entry exactly once, so a worker killed during a backoff loses nothing.
"""

from __future__ import annotations

import asyncio

from pipeline.runtime.inflight import Consumer
from pipeline.runtime.wire import ENVELOPE_FIELD, ID_FIELD

_BATCH = 500


async def promote_loop(runner: Consumer) -> None:
    every_ms = runner.ctx.settings.retry.promote_every_ms
    while True:
        moved, wait_ms = await promote(runner)
        if moved >= _BATCH:
            continue
        sleep_ms = every_ms if wait_ms < 0 else min(every_ms, max(5, wait_ms))
        await asyncio.sleep(sleep_ms / 1000)


async def promote(runner: Consumer) -> tuple[int, int]:
    """Move due entries back onto the stage's stream; returns (moved, ms until next due)."""
    moved, wait_ms = await runner.ctx.available.call(
        lambda: runner.ctx.scripts.promote(
            keys=[runner.delayed, runner.stream], args=[ENVELOPE_FIELD, ID_FIELD, _BATCH]
        )
    )
    return int(moved), int(wait_ms)
