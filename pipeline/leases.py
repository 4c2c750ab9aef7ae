"""Leases on in-flight entries: renew our own, reclaim lapsed ones, drain ours after a restart.

Guarantee 2. A lease is the entry's idle time in the consumer group's pending list: the owner
resets it (XCLAIM … JUSTID, only while it still owns the entry with the delivery count it
read), and any worker takes over entries idle for longer than `lease_ms` (XAUTOCLAIM). A long
Claude call is never stolen while its worker lives; a dead worker's entries move within
`lease_ms + reclaim_every_ms`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.runtime import Inflight, StageRunner

log = logging.getLogger(__name__)
_CHUNK = 500


async def renew_loop(runner: StageRunner) -> None:
    """Every third of a lease, renew entries we have held for a third of a lease or more."""
    every_s = runner.rt.lease_ms / 3000
    while True:
        await asyncio.sleep(every_s)
        now = time.monotonic()
        await renew(
            runner, [i for i in runner.inflight.values() if now - i.confirmed_at >= every_s]
        )


async def renew(runner: StageRunner, held: list[Inflight], idle_ms: int = 0) -> list[str]:
    """Renew held entries (or, with `idle_ms` = lease, hand them back); returns ids we had lost."""
    lost_all: list[str] = []
    for i in range(0, len(held), _CHUNK):
        chunk = held[i : i + _CHUNK]
        args: list[object] = [runner.group, runner.ctx.consumer, idle_ms]
        for inf in chunk:
            args += (inf.entry_id, inf.deliveries)
        sent_at = time.monotonic()
        lost = await runner.ctx.available.call(
            lambda a=args: runner.ctx.scripts.renew(keys=[runner.stream], args=a)
        )
        lost_ids = {x.decode() for x in lost}
        for inf in chunk:
            if inf.entry_id in lost_ids:
                inf.lost = True
            else:
                inf.confirmed_at = sent_at
        if lost_ids:
            log.warning(
                "%s: %d entries were reclaimed by other workers while held here "
                "(stalled?); their results will be dropped",
                runner.name,
                len(lost_ids),
            )
        lost_all += lost_ids
    return lost_all


async def reclaim_loop(runner: StageRunner) -> None:
    every_s = runner.rt.reclaim_every_ms / 1000
    while True:
        await asyncio.sleep(every_s)
        if runner.ctx.stopping.is_set() or runner.paused:
            continue
        await reclaim(runner)


async def reclaim(runner: StageRunner) -> int:
    """Claim lapsed entries, at most as many as there are free slots (bounded prefetch)."""
    cursor, taken = "0-0", 0
    while (free := runner.free_slots()) > 0:
        sent_at = time.monotonic()
        args = [runner.group, runner.ctx.consumer, runner.rt.lease_ms, cursor, min(free, 100)]
        cursor_b, entries = await runner.ctx.available.call(
            lambda a=args: runner.ctx.scripts.reclaim(keys=[runner.stream], args=a)
        )
        ids = _start_all(runner, entries, sent_at)
        taken += len(ids)
        if ids:
            runner.stats["reclaimed"] += len(ids)
            log.info("%s: reclaimed %d entries whose lease lapsed", runner.name, len(ids))
            if runner.ctx.hooks:
                runner.ctx.spawn_hook("on_reclaim", runner.stage.name, ids)
        cursor = cursor_b.decode()
        if cursor == "0-0":
            break
    return taken


async def drain_own(runner: StageRunner) -> int:
    """On start, take back what this consumer name still holds from a previous life."""
    start, total = "-", 0
    while not runner.ctx.stopping.is_set():
        await runner.wait_for_slots(1)
        sent_at = time.monotonic()
        args = [runner.group, runner.ctx.consumer, start, runner.free_slots()]
        last, entries = await runner.ctx.available.call(
            lambda a=args: runner.ctx.scripts.drain(keys=[runner.stream], args=a)
        )
        total += len(_start_all(runner, entries, sent_at))
        if not last:
            break
        start = "(" + last.decode()
    if total:
        log.info(
            "%s: resumed %d entries left pending by this consumer's previous run",
            runner.name,
            total,
        )
    return total


def _start_all(runner: StageRunner, entries: list[list[object]], sent_at: float) -> list[str]:
    ids = []
    for entry_id_b, flat, deliveries in entries:
        entry_id = entry_id_b.decode()  # type: ignore[attr-defined]
        it = iter(flat)  # type: ignore[call-overload]
        runner.start(entry_id, dict(zip(it, it, strict=True)), int(deliveries), sent_at)  # type: ignore[call-overload]
        ids.append(entry_id)
    return ids
