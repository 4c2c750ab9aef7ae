"""`pipeline status --watch`: the status numbers plus rates, from successive polls.

Each poll is a few pipelined round trips (no SCAN of tasks or results): `cli.status.gather`, then
each stream's `entries-added` (XINFO STREAM), the `counters` hash, the latest completions on
`<prefix>:done`, the rate limiter's state and today's ledger. Rates come from the difference
between two polls:

- throughput of a stage = entries that *left* its stream per second. Acked entries are deleted,
  so `Δentries-added - Δbacklog` is exactly what was handed on (Redis >= 7 reports
  entries-added; on 6.2 the column shows `-`). With partitions, summed over them (a stream
  not created yet in one of them leaves the rate unknown until it is).
- cache hit rate = Δcache_hits / Δ(cache_hits + cache_misses) of the `counters` hash.
- 429 rate = Δ429 answers / Δcalls admitted by the rate limiter, over every key and family.

Redis's eviction policy and persistence (`pipeline.runtime.redis_durability`) are read with
the first poll and every `DURABILITY_EVERY_S` after, not every poll: a CONFIG GET that an
ACL refuses is logged in the server's ACL LOG each time.

Per-stage p99 needs a histogram, which Redis does not keep: Grafana has it
(`pipeline_stage_duration_seconds`). The watch shows instead the end-to-end p50/p99 of the last
completions (their results' `latency_ms`) and the oldest pending entry's age per stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from redis.asyncio import Redis

from pipeline.claude.settings import Settings
from pipeline.cli.status import PipelineStatus, gather
from pipeline.runtime.keys import Keys
from pipeline.runtime.stage import App

log = logging.getLogger(__name__)

#: Completions sampled for the end-to-end latency percentiles.
RECENT_DONE = 200
#: Seconds between two reads of Redis's eviction and persistence settings.
DURABILITY_EVERY_S = 60.0


class Poll(msgspec.Struct, frozen=True, kw_only=True):
    """One moment: the status and the cumulative counts rates are computed from."""

    status: PipelineStatus
    at_s: float  # Redis's clock
    entries_added: dict[str, int]  # stream key -> entries ever added (Redis >= 7)
    cache_hits: int
    cache_misses: int
    calls: int  # admitted by the rate limiter, all keys and families
    throttled_429: int
    latencies_ms: list[int]  # of the latest completions, newest first
    spend_today_usd: float | None  # None: no ledger


class StageRate(msgspec.Struct, frozen=True, kw_only=True):
    stage: str
    lane: str | None
    per_s: float | None  # None: unknown (first poll, or Redis 6.2)


class WatchView(msgspec.Struct, frozen=True, kw_only=True):
    """What one refresh shows: the latest poll and the rates since the one before."""

    poll: Poll
    rates: list[StageRate]
    cache_hit_rate: float | None  # of the lookups since the previous poll
    cache_hit_rate_total: float | None  # since the counters began
    rate_429: float | None  # share of calls answered 429 since the previous poll
    p50_ms: float | None
    p99_ms: float | None
    interval_s: float | None


async def poll(
    redis: Redis, keys: Keys, app: App, settings: Settings, *, durability: bool = False
) -> Poll:
    """One poll; `durability` also reads Redis's eviction and persistence settings."""
    status = await gather(redis, keys, app, durability=durability)
    streams = [key for row in status.streams for key in row.keys]
    async with redis.pipeline(transaction=False) as pipe:
        for key in streams:
            pipe.xinfo_stream(key)
        pipe.hgetall(keys.counters)
        pipe.xrevrange(keys.done, count=RECENT_DONE)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    added: dict[str, int] = {}
    infos = iter(replies)
    for row in status.streams:  # with partitions, summed over the row's partition streams
        each = [info.get("entries-added") if isinstance(info, dict) else None
                for info in itertools.islice(infos, len(row.keys))]  # fmt: skip
        if all(isinstance(n, int) for n in each):
            added[row.stream] = sum(n for n in each if isinstance(n, int))
    counters = replies[len(streams)]
    counts = {_text(k): _int(v) for k, v in counters.items()} if isinstance(counters, dict) else {}
    done = replies[-1] if isinstance(replies[-1], list) else []
    calls, throttled = await _limiter_counts(redis, keys, settings)
    return Poll(
        status=status,
        at_s=status.server_time_ms / 1000,
        entries_added=added,
        cache_hits=counts.get("cache_hits", 0),
        cache_misses=counts.get("cache_misses", 0),
        calls=calls,
        throttled_429=throttled,
        latencies_ms=await _latencies(redis, keys, done),
        spend_today_usd=await _spend_today(redis, keys, status.server_time_ms),
    )


def view(cur: Poll, prev: Poll | None) -> WatchView:
    """The rates between two polls (none on the first)."""
    dt = cur.at_s - prev.at_s if prev is not None else 0.0
    rates = []
    for row in cur.status.streams:
        per_s = None
        if prev is not None and dt > 0 and row.stream in cur.entries_added:
            before = next((r for r in prev.status.streams if r.stream == row.stream), None)
            if before is not None and row.stream in prev.entries_added:
                added = cur.entries_added[row.stream] - prev.entries_added[row.stream]
                per_s = max(0.0, (added - (row.backlog - before.backlog)) / dt)
        rates.append(StageRate(stage=row.stage, lane=row.lane, per_s=per_s))
    hits = misses = calls = throttled = 0
    if prev is not None:
        hits, misses = cur.cache_hits - prev.cache_hits, cur.cache_misses - prev.cache_misses
        calls, throttled = cur.calls - prev.calls, cur.throttled_429 - prev.throttled_429
    return WatchView(
        poll=cur,
        rates=rates,
        cache_hit_rate=_share(hits, hits + misses),
        cache_hit_rate_total=_share(cur.cache_hits, cur.cache_hits + cur.cache_misses),
        rate_429=_share(throttled, calls),
        p50_ms=percentile(cur.latencies_ms, 50),
        p99_ms=percentile(cur.latencies_ms, 99),
        interval_s=dt if prev is not None else None,
    )


def percentile(values: Sequence[int], p: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)])


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole > 0 else None


async def _latencies(redis: Redis, keys: Keys, done: list[Any]) -> list[int]:
    """`latency_ms` of the results behind the latest done events (expired ones skipped)."""
    ids = [_text(fields.get(b"id", b"")) for _, fields in done if isinstance(fields, dict)]
    if not ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for task_id in ids:
            pipe.hget(keys.result(task_id), "latency_ms")
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    return [int(r) for r in replies if isinstance(r, bytes | str) and str(_text(r)).isdigit()]


async def _limiter_counts(redis: Redis, keys: Keys, settings: Settings) -> tuple[int, int]:
    """Calls admitted and 429s seen by the shared rate limiter (0, 0 without one)."""
    try:
        from pipeline.claude.ratelimit import limiter_state

        states = await limiter_state(redis, keys, settings.ratelimit)
    except Exception as exc:  # a view only: never fail the watch over it
        log.debug("no rate limiter state: %r", exc)
        return 0, 0
    return sum(s.admitted for s in states), sum(s.throttled_429 for s in states)


async def _spend_today(redis: Redis, keys: Keys, now_ms: int) -> float | None:
    """Today's (UTC) spend from the cost ledger, if there is one."""
    try:
        from pipeline.claude.ledger import read_days

        today = datetime.datetime.fromtimestamp(now_ms / 1000, datetime.UTC).date()
        entries = await read_days(redis, keys, [today])
    except Exception as exc:
        log.debug("no ledger: %r", exc)
        return None
    return sum(row.totals.cost_pico for row in entries.rows) / 1e12


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _int(value: object) -> int:
    try:
        return int(_text(value))
    except ValueError:
        return 0


async def run_watch(
    redis: Redis,
    keys: Keys,
    app: App,
    settings: Settings,
    show: Callable[[WatchView], None],
    *,
    interval_s: float,
    iterations: int = 0,
    stop: asyncio.Event | None = None,
) -> None:
    """Poll every `interval_s` and `show` each view, `iterations` times (0: until `stop`).

    `stop` ends the loop between polls: a Ctrl-C delivered as a cancellation could land
    inside a Redis command, which redis-py may turn into a connection error instead.
    """
    stop = stop or asyncio.Event()
    prev: Poll | None = None
    shown = 0
    checked_at = -math.inf
    while not stop.is_set():
        started = time.monotonic()
        check = started - checked_at >= DURABILITY_EVERY_S
        cur = await poll(redis, keys, app, settings, durability=check)
        if check:
            checked_at = started
        elif prev is not None:  # the last reading stands until the next one
            status = msgspec.structs.replace(cur.status, redis=prev.status.redis)
            cur = msgspec.structs.replace(cur, status=status)
        show(view(cur, prev))
        prev, shown = cur, shown + 1
        if iterations and shown >= iterations:
            return
        with contextlib.suppress(TimeoutError):
            left = max(0.0, interval_s - (time.monotonic() - started))
            await asyncio.wait_for(stop.wait(), left)


__all__ = [
    "DURABILITY_EVERY_S",
    "Poll",
    "StageRate",
    "WatchView",
    "percentile",
    "poll",
    "run_watch",
    "view",
]
