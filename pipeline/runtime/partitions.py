"""With partitions (a Redis Cluster), producers keep their one stream and their result keys.

A producer XADDs `<prefix>:tasks` and reads `<prefix>:result:<id>` and `<prefix>:done`, which
lie in slots of their own; everything a task's hand-offs touch lies in its partition's slot
(`pipeline.runtime.keys`). Two steps join them, each one idempotent, so that a process killed
between its two writes is simply followed by another that does the step again:

- **`IngressMover`** reads the ingress with a consumer group and puts each entry, as the
  envelope the first stage would have made of it (the ingress entry id kept as its origin),
  onto its task's partition stream, together with a marker in that slot (`move.lua`: one
  step); then acknowledges it. An entry moved but not acknowledged (the mover died) is moved
  again by another mover after its lease: the marker says it is there already.
- **`ResultPublisher`** reads a partition's queue of landed results (`Keys.landed`, where the
  last hand-off announces each result it wrote into the partition, first writer wins) and
  mirrors each result to `<prefix>:result:<id>` with the same remaining TTL, adds the
  completion event to `<prefix>:done`, then acknowledges. Done again after a crash, it writes
  the same hash and a second event (waiters look results up by id, so a repeat is harmless).
  It mirrors the partition's copy as it is when published, so an id reused after its result
  expired gets its own new result, never the old one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from pipeline.runtime.context import WorkerContext
from pipeline.runtime.errors import InvalidTask
from pipeline.runtime.groups import ensure_group
from pipeline.runtime.keys import Keys
from pipeline.runtime.replies import as_str, read_entries
from pipeline.runtime.scripts import load, script_text
from pipeline.runtime.wire import (
    ENVELOPE_FIELD,
    ID_FIELD,
    decode_entry,
    internal_entry,
    task_id_of,
)

__all__ = ["IngressMover", "ResultPublisher", "moved", "moved_fields"]

log = logging.getLogger(__name__)

#: How long a moved ingress entry's marker lives: far longer than a lease and an outage.
MOVED_TTL_S = 3600
_GROUP_MOVE = "move"
_Entries = list[tuple[str, dict[bytes, bytes]]]
_GROUP_PUBLISH = "publish"


def moved_fields(entry_id: str, raw: dict[bytes, bytes], max_entry_bytes: int) -> dict[str, Any]:
    """The partition entry for an ingress entry (`moved`)."""
    return moved(entry_id, raw, max_entry_bytes)[1]


def moved(
    entry_id: str, raw: dict[bytes, bytes], max_entry_bytes: int
) -> tuple[str, dict[str, Any]]:
    """The task id an ingress entry is moved under (its partition follows from it), and the
    partition entry: the envelope the first stage would make of it (its origin: the ingress
    entry), or, if it cannot be read, its fields as they came, for the first stage to
    dead-letter under the task's id as it would on one node (what `task_id_of` finds
    without reading it). Either way the entry names that id, so that the first stage,
    reading it in the partition under another entry id, files it under the same one."""
    try:
        env = decode_entry(entry_id, raw, max_entry_bytes)
    except InvalidTask:
        fields: dict[str, Any] = {as_str(name): value for name, value in raw.items()}
        name = ID_FIELD if ENVELOPE_FIELD in raw else b"id"
        if not raw.get(name):  # the task id is the ingress entry's id (`task_id_of`)
            fields[as_str(name)] = entry_id
        return task_id_of(entry_id, raw), fields
    env = msgspec.structs.replace(env, origin_id=env.origin_id or entry_id)
    return env.task_id, internal_entry(env)


class _QueueLoop:
    """A consumer-group reader of one stream that takes over what a dead reader left (after
    a lease) and acknowledges and deletes what it has handled."""

    def __init__(self, ctx: WorkerContext, stream: str, group: str, name: str) -> None:
        self.ctx, self.stream, self.group, self.name = ctx, stream, group, name
        rt = ctx.settings.runtime
        self._count, self._block_ms, self._lease_ms = rt.read_count, rt.block_ms, rt.lease_ms
        self._reclaimed_at = 0.0
        self.handled = 0

    async def run(self, handle: Callable[[_Entries], Awaitable[None]]) -> None:
        await self._ensure_group()
        while not self.ctx.stopping.is_set():
            entries = await self._take()
            if entries:
                await handle(entries)
                await self._ack([entry_id for entry_id, _ in entries])
                self.handled += len(entries)
        log.info("%s stopped: handled %d", self.name, self.handled)

    async def _take(self) -> list[tuple[str, dict[bytes, bytes]]]:
        redis, available = self.ctx.redis, self.ctx.available
        now = time.monotonic()
        if now - self._reclaimed_at >= self._lease_ms / 1000:
            self._reclaimed_at = now
            reply = await available.call(
                lambda: redis.xautoclaim(self.stream, self.group, self.ctx.consumer,
                                         self._lease_ms, "0-0", count=self._count),
                self._ensure_group,
            )  # fmt: skip
            claimed = [(as_str(i), raw) for i, raw in reply[1] if raw]
            if claimed:
                log.info("%s: took over %d entries a stopped reader left", self.name, len(claimed))
                return claimed
        # Short blocks: the loop notices a stop (and its reclaim turn) promptly.
        block = min(self._block_ms, 1000)
        read: Callable[[], Awaitable[object]] = lambda: redis.xreadgroup(  # noqa: E731
            self.group, self.ctx.consumer, {self.stream: ">"}, count=self._count, block=block
        )
        got = await available.call(read, self._ensure_group)
        return [(entry_id, raw) for entry_id, raw in read_entries(got) if raw]

    async def _ack(self, ids: list[str]) -> None:
        redis = self.ctx.redis

        async def ack() -> None:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.xack(self.stream, self.group, *ids)
                pipe.xdel(self.stream, *ids)
                await pipe.execute()

        await self.ctx.available.call(ack)

    async def _ensure_group(self) -> None:
        await ensure_group(self.ctx.redis, self.ctx.available, self.stream, self.group)


class IngressMover:
    """Moves ingress entries into their tasks' partitions (run beside the first stage)."""

    def __init__(self, ctx: WorkerContext, keys: Keys, first_stream: str) -> None:
        """`first_stream`: the first stage's stream name (`tasks`), in each partition."""
        self._ctx, self._keys, self._first = ctx, keys, first_stream
        self._loop = _QueueLoop(ctx, keys.ingress, _GROUP_MOVE, "ingress mover")
        self._move = load(ctx.redis, "move")
        self._max_bytes = ctx.settings.runtime.max_entry_bytes

    async def run(self) -> None:
        await self._loop.run(self._handle)

    async def _handle(self, entries: list[tuple[str, dict[bytes, bytes]]]) -> None:
        calls = self._calls(entries)

        async def move() -> None:
            # Concurrently: one script per partition, in its slot.
            await asyncio.gather(*(self._ctx.available.call(call) for call, _ in calls))

        if self._ctx.replication is None:
            await move()
        else:  # in a replica before the ingress lets go
            await self._ctx.replication.write(move, *(stream for _, stream in calls))

    def _calls(
        self, entries: list[tuple[str, dict[bytes, bytes]]]
    ) -> list[tuple[Callable[[], Awaitable[object]], str]]:
        """The moves of a batch, one per partition (safe to repeat: `move.lua`), and the
        streams they go to."""
        by_part: dict[int | None, tuple[list[str], list[Any]]] = {}
        for entry_id, raw in entries:
            task_id, fields = moved(entry_id, raw, self._max_bytes)
            part = self._keys.for_task(task_id)
            keys, args = by_part.setdefault(
                part.partition, ([part.stream(self._first)], [MOVED_TTL_S])
            )
            keys.append(part.moved(entry_id))
            args.append(len(fields))
            for name, value in fields.items():
                args += (name, value)
        return [(self._call(keys, args), keys[0]) for keys, args in by_part.values()]

    def _call(self, keys: list[str], args: list[Any]) -> Callable[[], Awaitable[object]]:
        return lambda: self._move(keys=keys, args=args)


class ResultPublisher:
    """Publishes one partition's landed results where producers read them."""

    def __init__(self, ctx: WorkerContext, keys: Keys) -> None:
        """`keys`: the partition's keys."""
        self._ctx, self._keys = ctx, keys
        self._loop = _QueueLoop(ctx, keys.landed, _GROUP_PUBLISH,
                                f"result publisher p{keys.partition}")  # fmt: skip
        # Sent whole (EVAL) in a pipeline: a primary promoted by a failover may not have it
        # cached, and a pipeline cannot load it on NOSCRIPT as a script call does.
        self._mirror = script_text("publish")
        self._done_maxlen = ctx.settings.results.done_maxlen

    async def run(self) -> None:
        await self._loop.run(self._handle)

    async def _handle(self, events: list[tuple[str, dict[bytes, bytes]]]) -> None:
        ids = [as_str(fields.get(b"id", b"")) for _, fields in events]
        ids = [task_id for task_id in ids if task_id]
        if not ids:
            return

        async def publish() -> None:
            await self._publish_batch(ids, [fields for _, fields in events if fields.get(b"id")])

        if self._ctx.replication is None:
            await publish()
            return
        # In a replica (the results and their events) before the queue lets go. Every
        # result key's primary is asked: which ones this batch wrote is known only once read.
        keys = [self._keys.result(task_id) for task_id in ids]
        await self._ctx.replication.write(publish, *keys, self._keys.done)

    async def _publish_batch(self, ids: list[str], events: list[dict[bytes, bytes]]) -> None:
        """Publish a batch of results (safe to repeat: the same hashes, the events again):
        read them in the partition (one round trip, one slot), mirror each to its key (one
        round trip per primary), then add their events (one round trip): a waiter woken by
        an event finds the result there."""
        redis, available = self._ctx.redis, self._ctx.available

        async def read() -> list[Any]:
            async with redis.pipeline(transaction=False) as pipe:
                for task_id in ids:
                    pipe.hgetall(self._keys.landing(task_id))
                    pipe.pttl(self._keys.landing(task_id))
                return list(await pipe.execute())

        replies = await available.call(read)
        found = [
            (task_id, event, result, pttl)
            for task_id, event, result, pttl in zip(
                ids, events, replies[::2], replies[1::2], strict=True
            )
            # Expired or taken back (a DLQ replay) since it landed: nothing to publish.
            if result and isinstance(pttl, int) and pttl > 0
        ]
        if not found:
            return

        async def mirror() -> None:
            async with redis.pipeline(transaction=False) as pipe:
                for task_id, _event, result, pttl in found:
                    args: list[Any] = [pttl]
                    for name, value in result.items():
                        args += (name, value)
                    pipe.eval(self._mirror, 1, self._keys.result(task_id), *args)
                await pipe.execute()

        async def announce() -> None:
            async with redis.pipeline(transaction=False) as pipe:
                for _task_id, event, _result, _pttl in found:
                    fields: Any = dict(event)
                    pipe.xadd(self._keys.done, fields, maxlen=self._done_maxlen,
                              approximate=True)  # fmt: skip
                await pipe.execute()

        await available.call(mirror)
        await available.call(announce)
