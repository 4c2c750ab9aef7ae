"""Why a task has no result yet, when Redis can tell: `submit --wait` and `result --wait`
say it after "no result within Ns" instead of leaving a new user to guess.

What is knowable, in order: a stage paused (refused or missing credentials: the pause key the
runner sets, as `pipeline status` shows it), then stages nothing consumes (no consumer group
yet, or only consumer names that have neither read recently nor hold anything: dead workers).
Before Redis 7.2, a consumer's `idle` counts from its last read that returned entries, not
from its last attempt, so an idle worker blocked on an empty stream looks dead by it; there a
consumer whose name a live worker still holds (`<prefix>:worker:<name>`) counts as live.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from pipeline.runtime.keys import Keys
from pipeline.runtime.settings import BaseSettings
from pipeline.runtime.stage import App
from pipeline.runtime.status import PauseStatus, StreamStatus, gather_status

__all__ = ["pause_hint", "why_no_result"]

#: A consumer that read within this long (or holds entries) is a live worker's: a worker
#: reads every `block_ms` while it has free slots, and holds entries while it has none.
LIVE_WITHIN_MS = 30_000
START_HINT = "start one: pipeline worker --all"


async def why_no_result(redis: Redis, keys: Keys, app: App, settings: BaseSettings) -> str | None:
    """The first reason Redis shows for tasks not finishing, with what to do; None if none
    (the pipeline may just be busy)."""
    status = await gather_status(redis, keys, app)
    if status.paused:
        return _paused(status.paused[0])
    idle = await _unconsumed(redis, keys, status.streams, settings)
    if not idle:
        return None
    if len(idle) == len(status.streams):
        return f"no worker is consuming any stage ({START_HINT})"
    waiting = [row for row in idle if row.backlog or row.delayed]  # else not why tasks wait
    if not waiting:
        return None
    names = ", ".join(_name(row) for row in waiting)
    return f"no worker is consuming {names} (start one: pipeline worker --stage NAME, or --all)"


def pause_hint(reason: str) -> str:
    """What to do about a pause, from its reason (the runner's AuthError text)."""
    if "no API key" in reason:
        return (
            "set ANTHROPIC_API_KEY for the workers, or point ANTHROPIC_BASE_URL at "
            "`pipeline fake-claude` with any key"
        )
    return "fix the workers' credentials (ANTHROPIC_API_KEY); the stage resumes by itself"


def _paused(pause: PauseStatus) -> str:
    reason = "no API key" if "no API key" in pause.reason else _short(pause.reason, 100)
    return f"{pause.stage} is paused ({reason}); {pause_hint(pause.reason)}"


async def _unconsumed(
    redis: Redis, keys: Keys, streams: list[StreamStatus], settings: BaseSettings
) -> list[StreamStatus]:
    """The streams (stage lanes) no live worker reads; with partitions, those of which some
    partition has no live reader (a worker may serve only some: `--partitions`)."""
    grouped = [row for row in streams if row.group_exists and row.consumers]
    asked = [(row, key) for row in grouped for key in row.keys]
    async with redis.pipeline(transaction=False) as pipe:
        for row, key in asked:
            pipe.xinfo_consumers(key, row.stage)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    held = await _held_names(redis, keys, replies)
    unread: dict[str, int] = {}  # row -> its streams without a live reader
    for (row, _), consumers in zip(asked, replies, strict=True):
        block_ms = settings.runtime_for(row.stage).block_ms
        live = isinstance(consumers, list) and any(_live(c, block_ms, held) for c in consumers)
        unread[row.stream] = unread.get(row.stream, 0) + (not live)
    return [row for row in streams if unread.get(row.stream, 1)]


async def _held_names(redis: Redis, keys: Keys, replies: list[Any]) -> set[str]:
    """The consumer names a live worker holds, of those whose `idle` cannot tell (a reply
    without `inactive`: Redis before 7.2)."""
    names = sorted({_text(c.get("name")) for consumers in replies if isinstance(consumers, list)
                    for c in consumers if "inactive" not in c})  # fmt: skip
    if not names:
        return set()
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.exists(keys.worker(name))
        found: list[Any] = await pipe.execute(raise_on_error=False)
    return {name for name, n in zip(names, found, strict=True) if n == 1}


def _live(consumer: dict[Any, Any], block_ms: int, held: set[str]) -> bool:
    pending = int(consumer.get("pending") or 0)
    idle_ms = int(consumer.get("idle") or 0)
    recent = idle_ms < max(LIVE_WITHIN_MS, 3 * block_ms)
    return pending > 0 or recent or _text(consumer.get("name")) in held


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _name(row: StreamStatus) -> str:
    return f"{row.stage} (lane {row.lane})" if row.lane else row.stage


def _short(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
