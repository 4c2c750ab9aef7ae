"""The runtime's numbers behind `pipeline status` and the queue gauges: backlog, pending,
lag, age, retries, DLQ, pauses, what stages hold outside their streams, and (asked for by the
command, not by the metrics poller) Redis's eviction and persistence.

All of them are read in one pipelined round trip, with the server's own clock for ages, so
the picture is consistent and the command is cheap enough to run in a `watch` loop.

With partitions each stage's stream exists once per partition: every partition is read in
the same round trip (split per node by the client on a Cluster) and the numbers are summed
per stage and lane, so one row still says what one stage holds; the two steps that join the
partitions to what producers touch add theirs (`Status.unmoved`, `Status.unpublished`).
"""

from __future__ import annotations

from typing import Any

import msgspec
from redis.asyncio import Redis

from pipeline.runtime.held import HeldStatus
from pipeline.runtime.keys import Keys
from pipeline.runtime.redis_conn import is_cluster
from pipeline.runtime.redis_durability import (
    RedisDurability,
    inspect_durability,
    parse_durability,
    queue_durability,
)
from pipeline.runtime.stage import App
from pipeline.runtime.wire import entry_ms


class StreamStatus(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One stage's input stream (one lane of it, for claude-call); with partitions, that
    stream in every partition, summed."""

    stage: str
    lane: str | None
    stream: str  # the stream's key; with partitions a name for all of them, `<prefix>:{p0-3}:…`
    backlog: int  # entries in the stream: acked entries are deleted, so this is the backlog
    pending: int  # delivered to a worker, not yet handed on
    lag: int | None  # entries not yet delivered to the group (Redis >= 7; None on 6.2)
    consumers: int  # with partitions, the most any partition's group has
    oldest_pending_s: float | None  # age of the oldest pending entry, since it was added
    delayed: int  # waiting in the delayed-retry set
    group_exists: bool  # False until a worker of the stage has started once
    partition_streams: list[str] = []  # with partitions: the keys summed here, by partition

    @property
    def keys(self) -> list[str]:
        """The stream keys this row reads: each partition's, or the one stream."""
        return self.partition_streams or [self.stream]


class PauseStatus(msgspec.Struct, frozen=True, kw_only=True):
    stage: str
    reason: str
    remaining_s: float | None


class Status(msgspec.Struct, frozen=True, kw_only=True):
    """The whole pipeline at one moment (`server_time_ms`, Redis's clock)."""

    streams: list[StreamStatus]
    dlq: int  # with partitions, every partition's DLQ
    paused: list[PauseStatus]
    server_time_ms: int
    redis: RedisDurability | None = None  # eviction and persistence, when asked for
    held: list[HeldStatus] = []  # what stages hold outside their streams (`runtime.held`)
    partitions: int = 0  # the deployment's (0: none)
    # With partitions (None without): producers' tasks not yet moved into their partition
    # (`<prefix>:tasks`), and results landed in a partition not yet published where
    # producers read them (every partition's queue of them). Both stay near 0 while workers
    # run the first stage (the mover) and every partition (the publishers).
    unmoved: int | None = None
    unpublished: int | None = None


async def gather_status(
    redis: Redis,
    keys: Keys,
    app: App,
    *,
    durability: bool = False,
) -> Status:
    """Read every stage's numbers in one round trip (and a stage's `held` reader, for a stage
    that has one, after it).

    Missing streams and groups read as zeros (a stage nobody has started yet), never as errors.
    `durability` adds the server's eviction and persistence settings and their findings
    (`pipeline.runtime.redis_durability`) to the same round trip; on a Cluster, where
    keyless commands cannot be pipelined, each primary is asked after it (and the clock
    before it). The metrics poller leaves it off: every few seconds a CONFIG GET that an ACL
    refuses would fill the server's ACL LOG.
    """
    lanes = [(stage, lane) for stage in app.stages for lane in (stage.lanes or (None,))]
    parts = keys.each_partition()
    cluster = is_cluster(redis)
    clock = await redis.time() if cluster else None
    async with redis.pipeline(transaction=False) as pipe:
        if clock is None:
            pipe.time()
        for part in parts:
            pipe.xlen(part.dlq)
        for stage in app.stages:
            pipe.get(keys.pause(stage.name))
            pipe.pttl(keys.pause(stage.name))
        for stage, lane in lanes:
            for part in parts:
                stream = part.stream(stage.stream, lane)
                pipe.xlen(stream)
                pipe.xinfo_groups(stream)
                pipe.xpending(stream, stage.name)
                pipe.zcard(part.delayed(stream))
        if keys.partitions:
            pipe.xlen(keys.ingress)
            for part in parts:
                pipe.xlen(part.landed)
        checks = queue_durability(pipe) if durability and not cluster else 0
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    found: RedisDurability | None = None
    if checks:
        found = parse_durability(replies[len(replies) - checks :])
    elif durability:
        found = await inspect_durability(redis)
    if clock is None:
        clock, replies = replies[0], replies[1:]
    for reply in [clock, *replies[: len(parts)]]:
        if isinstance(reply, Exception):
            raise reply
    seconds, micros = clock
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    dlq = sum(_int(r) for r in replies[: len(parts)])
    at = len(parts)
    paused: list[PauseStatus] = []
    for stage in app.stages:
        reason, pttl = replies[at], replies[at + 1]
        at += 2
        if isinstance(reason, bytes):
            remaining = pttl / 1000 if isinstance(pttl, int) and pttl >= 0 else None
            paused.append(
                PauseStatus(stage=stage.name, reason=reason.decode(errors="replace"),
                            remaining_s=remaining)
            )  # fmt: skip
    streams: list[StreamStatus] = []
    for stage, lane in lanes:
        read = [replies[at + 4 * n : at + 4 * n + 4] for n in range(len(parts))]
        at += 4 * len(parts)
        streams.append(_merged(stage.name, lane, keys, stage.stream, read, now_ms))
    unmoved = unpublished = None
    if keys.partitions:
        unmoved = _int(replies[at])
        unpublished = sum(_int(r) for r in replies[at + 1 : at + 1 + len(parts)])
    held = [await stage.held(redis, keys, lane) for stage, lane in lanes if stage.held is not None]
    return Status(
        streams=streams,
        dlq=dlq,
        paused=paused,
        server_time_ms=now_ms,
        redis=found,
        held=held,
        partitions=keys.partitions,
        unmoved=unmoved,
        unpublished=unpublished,
    )


def _merged(
    stage: str, lane: str | None, keys: Keys, name: str, read: list[list[Any]], now_ms: int
) -> StreamStatus:
    """One row from each partition's (XLEN, XINFO GROUPS, XPENDING, ZCARD) of the stream:
    counts summed, the oldest pending entry the oldest of all, the lag known only if known
    in every partition whose group exists."""
    backlog = pending = delayed = consumers = 0
    lags: list[int | None] = []
    oldest: str | None = None
    for length, groups, summary, waiting in read:
        group = _group(groups, stage)
        count = _int(summary.get("pending")) if isinstance(summary, dict) else 0
        first = summary.get("min") if isinstance(summary, dict) and count else None
        if first is not None:
            text = first.decode() if isinstance(first, bytes) else str(first)
            if oldest is None or _id_key(text) < _id_key(oldest):
                oldest = text
        backlog, pending, delayed = backlog + _int(length), pending + count, delayed + _int(waiting)
        if group is not None:
            lags.append(_int(group["lag"]) if group.get("lag") is not None else None)
            consumers = max(consumers, _int(group.get("consumers")))
    lag = None if not lags or None in lags else sum(v for v in lags if v is not None)
    partition_streams: list[str] = []
    stream = keys.stream(name, lane)
    if keys.partitions:
        partition_streams = [part.stream(name, lane) for part in keys.each_partition()]
        stream = keys.stream(name, lane).replace(
            f"{keys.prefix}:", f"{keys.prefix}:{{p0-{keys.partitions - 1}}}:", 1
        )
    return StreamStatus(
        stage=stage,
        lane=lane,
        stream=stream,
        backlog=backlog,
        pending=pending,
        lag=lag,
        consumers=consumers,
        oldest_pending_s=_age_s(oldest, now_ms),
        delayed=delayed,
        group_exists=bool(lags),
        partition_streams=partition_streams,
    )


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _group(groups: object, name: str) -> dict[str, Any] | None:
    if not isinstance(groups, list):
        return None  # no such stream yet (an error reply)
    for group in groups:
        found = group.get("name")
        if (found.decode() if isinstance(found, bytes) else found) == name:
            return dict(group)
    return None


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _age_s(entry_id: object, now_ms: int) -> float | None:
    if entry_id is None:
        return None
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return max(0.0, (now_ms - entry_ms(text)) / 1000)


__all__ = ["PauseStatus", "Status", "StreamStatus", "gather_status"]
