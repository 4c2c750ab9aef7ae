"""Leases on in-flight entries: renew our own, reclaim lapsed ones, drain ours after a restart.

The "Crashes are recovered fast" guarantee. A lease is the entry's idle time in the consumer
group's pending list: the owner resets it (XCLAIM … JUSTID, only while it still owns the entry
with the delivery count it read), and any worker takes over entries idle for longer than
`lease_ms` (XAUTOCLAIM). A long Claude call is never stolen while its worker lives; a dead
worker's entries move within `lease_ms + reclaim_every_ms`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from functools import partial
from typing import TYPE_CHECKING

import redis

from pipeline.runtime.inflight import Consumer, Inflight
from pipeline.runtime.replies import as_list, as_str, script_entries

if TYPE_CHECKING:
    from redis.typing import EncodableT


log = logging.getLogger(__name__)
_CHUNK = 500


async def renew_loop(runner: Consumer) -> None:
    """Every third of a lease, renew entries we have held for a third of a lease or more."""
    every_s = runner.rt.lease_ms / 3000
    while True:
        await asyncio.sleep(every_s)
        now = time.monotonic()
        await renew(
            runner, [i for i in runner.inflight.values() if now - i.confirmed_at >= every_s]
        )


async def renew(runner: Consumer, held: list[Inflight], idle_ms: int = 0) -> list[str]:
    """Renew held entries (or, with `idle_ms` = lease, hand them back); returns ids we had lost."""
    lost_all: list[str] = []
    for i in range(0, len(held), _CHUNK):
        chunk = held[i : i + _CHUNK]
        args: list[EncodableT] = [runner.group, runner.ctx.consumer, idle_ms]
        for inf in chunk:
            args += (inf.entry_id, inf.deliveries)
        sent_at = time.monotonic()
        lost = await runner.ctx.available.call(
            partial(runner.ctx.scripts.renew, keys=[runner.stream], args=args),
            runner.recreate_group,
        )
        lost_ids = {as_str(x) for x in as_list(lost)}
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


async def reclaim_loop(runner: Consumer) -> None:
    every_s = runner.rt.reclaim_every_ms / 1000
    prune_every_s = min(600.0, runner.rt.prune_idle_ms / 6000)
    next_prune = time.monotonic() + random.uniform(0, prune_every_s)
    while True:
        await asyncio.sleep(every_s)
        if runner.ctx.stopping.is_set():
            continue
        await reclaim(runner)
        if time.monotonic() >= next_prune:
            next_prune = time.monotonic() + prune_every_s
            await prune_consumers(runner)


async def prune_consumers(runner: Consumer) -> list[str]:
    """Forget consumer names that hold nothing and have not read for `prune_idle_ms`.

    Every restarted pod with a new name leaves one behind, and `pipeline status` would count
    them forever. Only names with no pending entries go (XGROUP DELCONSUMER would drop a
    name's pending entries); a live worker reads every `block_ms`, so it is never idle that
    long, and if it were, its next XREADGROUP simply creates the name again.
    """
    idle_ms = runner.rt.prune_idle_ms
    ctx = runner.ctx
    try:
        consumers = await ctx.available.call(
            lambda: ctx.redis.xinfo_consumers(runner.stream, runner.group)
        )
    except redis.ResponseError:  # no stream or group yet
        return []
    gone = [
        as_str(c["name"])
        for c in consumers
        if int(c["pending"]) == 0 and int(c["idle"]) > idle_ms and as_str(c["name"]) != ctx.consumer
    ]
    for name in gone:
        await ctx.available.call(
            lambda n=name: ctx.redis.xgroup_delconsumer(runner.stream, runner.group, n)  # type: ignore[misc]
        )
    if gone:
        log.info("%s: forgot %d idle consumer names with nothing pending", runner.name, len(gone))
    return gone


async def reclaim(runner: Consumer) -> int:
    """Claim lapsed entries, at most as many as there are free slots (bounded prefetch).

    A worker with no free slot (or a paused stage) still calls once, claiming nothing: the
    call keeps the stream's reclaim clock going, so a busy fleet is not taken for a stalled
    Redis (which would hold reclaims back for a lease once a slot frees).
    """
    cursor, taken = "0-0", 0
    keys = [runner.stream, runner.keys.reclaim_clock(runner.stream)]
    # A silence longer than this means Redis was stalled (see reclaim.lua); it must exceed
    # the reclaim interval, or every reclaim would look like the first after a stall.
    gap_ms = max(runner.rt.lease_ms // 2, 3 * runner.rt.reclaim_every_ms)

    while True:
        free = 0 if runner.paused else runner.free_slots()
        sent_at = time.monotonic()
        args: list[EncodableT] = [
            runner.group,
            runner.ctx.consumer,
            runner.rt.lease_ms,
            cursor,
            min(free, 100),
            gap_ms,
        ]
        reply = await runner.ctx.available.call(
            partial(runner.ctx.scripts.reclaim, keys=keys, args=args), runner.recreate_group
        )
        cursor_b, entries = as_list(reply)
        ids = _start_all(runner, entries, sent_at)
        taken += len(ids)
        if ids:
            runner.stats["reclaimed"] += len(ids)
            log.info("%s: reclaimed %d entries whose lease lapsed", runner.name, len(ids))
            if runner.ctx.hooks:
                runner.ctx.spawn_hook("on_reclaim", runner.stage.name, ids)
        cursor = as_str(cursor_b)
        if cursor == "0-0" or free == 0:
            break
    return taken


async def drain_own(runner: Consumer) -> int:
    """On start, take back what this consumer name still holds from a previous life."""
    start, total = "-", 0
    while not runner.ctx.stopping.is_set():
        await runner.wait_for_slots(1)
        sent_at = time.monotonic()
        args: list[EncodableT] = [runner.group, runner.ctx.consumer, start, runner.free_slots()]
        last_b, entries = as_list(
            await runner.ctx.available.call(
                partial(runner.ctx.scripts.drain, keys=[runner.stream], args=args),
                runner.recreate_group,
            )
        )
        total += len(_start_all(runner, entries, sent_at))
        last = as_str(last_b)
        if not last:
            break
        start = "(" + last
    if total:
        log.info(
            "%s: resumed %d entries left pending by this consumer's previous run",
            runner.name,
            total,
        )
    return total


def _start_all(runner: Consumer, entries: object, sent_at: float) -> list[str]:
    ids: list[str] = []
    for entry_id, fields, deliveries in script_entries(entries):
        runner.start(entry_id, fields, deliveries, sent_at)
        ids.append(entry_id)
    return ids
