"""How `Client.result(…, wait=…)` waits without polling: one done-stream reader per client
wakes the waiters of the task ids it sees, and their hash reads are batched.

Both classes belong to one `Client` and live as long as it does; neither is public API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from pipeline.runtime.errors import RedisUnavailable

__all__ = ["DoneWatcher", "HashLookups"]

# The name the client has always logged under (it was one module before it was a package).
log = logging.getLogger("pipeline.client")

_Entries = list[tuple[bytes, dict[bytes, bytes]]]


class HashLookups:
    """HGETALLs from concurrent callers, group-committed into pipelined round trips.

    While one batch is on the wire the next collects, so 2,000 waiters woken together cost a
    few round trips on one connection instead of 2,000 connections.
    """

    _MAX_BATCH = 1000

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._queue: list[tuple[str, asyncio.Future[dict[bytes, bytes]]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        future: asyncio.Future[dict[bytes, bytes]] = asyncio.get_running_loop().create_future()
        self._queue.append((key, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._MAX_BATCH]
                del self._queue[: self._MAX_BATCH]
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for key, _ in batch:
                            pipe.hgetall(key)
                        rows = await pipe.execute()
                except (RedisError, OSError) as exc:
                    _settle(batch, exc)
                    continue
                except asyncio.CancelledError:  # nobody may be left waiting forever
                    _settle(batch + self._queue, RedisUnavailable("the client was closed"))
                    self._queue.clear()
                    raise
                for (_, future), row in zip(batch, rows, strict=True):
                    if not future.done():
                        future.set_result(row)
        finally:
            self._flusher = None


def _settle(
    batch: list[tuple[str, asyncio.Future[dict[bytes, bytes]]]], exc: BaseException
) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)


class DoneWatcher:
    """The one `XREAD BLOCK` loop on the done stream; wakes the waiters of each task id.

    Started by the first `result(…, wait=…)` and kept until `Client.aclose()`, so its position
    in the stream only moves forward and no completion slips between two waits.
    """

    def __init__(self, redis: Redis, done_key: str, block_ms: int) -> None:
        self._redis = redis
        self._key = done_key
        self._block_ms = block_ms
        self._cursor: bytes = b"0-0"
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def waiting(self) -> int:
        return sum(len(futures) for futures in self._waiters.values())

    async def start(self) -> None:
        """Capture `$` as a concrete id first, so no event after this moment is missed."""
        last = cast("_Entries", await self._redis.xrevrange(self._key, count=1))
        self._cursor = last[0][0] if last else b"0-0"
        self._task = asyncio.create_task(self._run(), name="pipeline-client-done-reader")

    def register(self, task_id: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(task_id, set()).add(future)
        return future

    def unregister(self, task_id: str, future: asyncio.Future[None]) -> None:
        futures = self._waiters.get(task_id)
        if futures is not None:
            futures.discard(future)
            if not futures:
                del self._waiters[task_id]

    async def aclose(self) -> None:
        if self._task is not None:
            self._closing = True
            # Cancelled again until it ends: redis-py's Cluster client at times swallows a
            # cancellation that lands mid-command and goes on reading (up to a whole block).
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait([self._task], timeout=0.1)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(RedisUnavailable("the client was closed"))
        self._waiters.clear()

    async def _run(self) -> None:
        delay_s, down = 0.05, False
        while not self._closing:
            try:
                reply = cast(
                    "list[tuple[bytes, _Entries]] | None",
                    await self._redis.xread(
                        {self._key: self._cursor}, count=1000, block=self._block_ms
                    ),
                )
            except (RedisError, OSError) as exc:
                if not down:
                    log.warning("done-stream reader: %r; retrying (waiters keep waiting)", exc)
                    down = True
                await asyncio.sleep(delay_s)
                delay_s = min(5.0, delay_s * 2)
                continue
            if down:
                log.warning("done-stream reader: reading again")
            delay_s, down = 0.05, False
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    self._cursor = entry_id
                    task_id = fields.get(b"id")
                    if task_id is not None:
                        self._wake(task_id.decode(errors="replace"))

    def _wake(self, task_id: str) -> None:
        for future in self._waiters.pop(task_id, ()):
            if not future.done():
                future.set_result(None)
