"""The runtime's numbers behind `pipeline status` and the queue gauges: backlog, pending,
lag, age, retries, DLQ, pauses, what stages hold outside their streams, and (asked for by the
command, not by the metrics poller) Redis's eviction and persistence.

All of them are read in one pipelined round trip, with the server's own clock for ages, so
the picture is consistent and the command is cheap enough to run in a `watch` loop.
"""

from __future__ import annotations

from typing import Any

import msgspec
from redis.asyncio import Redis

from pipeline.runtime.held import HeldStatus
from pipeline.runtime.keys import Keys
from pipeline.runtime.redis_durability import RedisDurability, parse_durability, queue_durability
from pipeline.runtime.stage import App
from pipeline.runtime.wire import entry_ms


class StreamStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One stage's input stream (one lane of it, for claude-call)."""

    stage: str
    lane: str | None
    stream: str
    backlog: int  # entries in the stream: acked entries are deleted, so this is the backlog
    pending: int  # delivered to a worker, not yet handed on
    lag: int | None  # entries not yet delivered to the group (Redis >= 7; None on 6.2)
    consumers: int
    oldest_pending_s: float | None  # age of the oldest pending entry, since it was added
    delayed: int  # waiting in the delayed-retry set
    group_exists: bool  # False until a worker of the stage has started once


class PauseStatus(msgspec.Struct, frozen=True, kw_only=True):
    stage: str
    reason: str
    remaining_s: float | None


class Status(msgspec.Struct, frozen=True, kw_only=True):
    """The whole pipeline at one moment (`server_time_ms`, Redis's clock)."""

    streams: list[StreamStatus]
    dlq: int
    paused: list[PauseStatus]
    server_time_ms: int
    redis: RedisDurability | None = None  # eviction and persistence, when asked for
    held: list[HeldStatus] = []  # what stages hold outside their streams (`runtime.held`)


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
    (`pipeline.runtime.redis_durability`) to the same round trip. The metrics poller leaves it off:
    every few seconds a CONFIG GET that an ACL refuses would fill the server's ACL LOG.
    """
    lanes = [(stage, lane) for stage in app.stages for lane in (stage.lanes or (None,))]
    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.xlen(keys.dlq)
        for stage in app.stages:
            pipe.get(keys.pause(stage.name))
            pipe.pttl(keys.pause(stage.name))
        for stage, lane in lanes:
            stream = keys.stream(stage.stream, lane)
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
            pipe.xpending(stream, stage.name)
            pipe.zcard(keys.delayed(stream))
        checks = queue_durability(pipe) if durability else 0
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    found = parse_durability(replies[len(replies) - checks :]) if durability else None
    for reply in replies[:2]:
        if isinstance(reply, Exception):
            raise reply
    seconds, micros = replies[0]
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    at = 2
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
        backlog, groups, summary, delayed = replies[at : at + 4]
        at += 4
        group = _group(groups, stage.name)
        pending = _int(summary.get("pending")) if isinstance(summary, dict) else 0
        oldest = summary.get("min") if isinstance(summary, dict) and pending else None
        streams.append(
            StreamStatus(
                stage=stage.name,
                lane=lane,
                stream=keys.stream(stage.stream, lane),
                backlog=_int(backlog),
                pending=pending,
                lag=_int(group["lag"]) if group and group.get("lag") is not None else None,
                consumers=_int(group.get("consumers")) if group else 0,
                oldest_pending_s=_age_s(oldest, now_ms),
                delayed=_int(delayed),
                group_exists=group is not None,
            )
        )
    held = [await stage.held(redis, keys, lane) for stage, lane in lanes if stage.held is not None]
    return Status(
        streams=streams,
        dlq=_int(replies[1]),
        paused=paused,
        server_time_ms=now_ms,
        redis=found,
        held=held,
    )


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
