"""Coalescing: identical requests in flight at the same time make one Claude call (guarantee 5).

The first task to take a flight's lease leads: it calls, renews the lease while it waits,
publishes its answer for a few seconds and lets go. Identical tasks arriving meanwhile
follow: they poll, backing off, for an answer published since they began to follow; a task
arriving after the answer leads a new flight (only the cache may reuse answers). A leader
that dies stops renewing and one whose call fails lets go without an answer; either way the
next follower to poll takes the lead, so nobody is stranded. Identity is the request's
canonical hash plus the routed model and max_tokens; a task with `cache=false` asked for a
fresh answer and flies alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import msgspec
from redis.asyncio import Redis
from redis.typing import EncodableT

from pipeline.keys import Keys
from pipeline.redis_conn import Availability
from pipeline.replies import as_int, as_list
from pipeline.scripts import load
from pipeline.task import Answer, Routed

log = logging.getLogger(__name__)

#: Followers poll for the answer from this often to this seldom (a call takes 2-30 s).
POLL_FIRST_S = 0.02
POLL_MAX_S = 0.5
#: How long a published answer waits for followers that have yet to poll.
ANSWER_TTL_MS = 15_000

_ANSWERED, _LEAD = 1, 2
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Answer).decode


def identity(routed: Routed) -> str | None:
    """What makes two tasks' calls the same one; None for a task that must call alone."""
    request = routed.request
    if not request.cache or not request.request_hash:
        return None
    return f"{request.request_hash}:{routed.model}:{routed.max_tokens}"


@dataclass(slots=True)
class Flight:
    """A task's seat: a follower's holds the leader's `answer`; a leader calls and `land`s."""

    answer: Answer | None = None
    landed: bool = False
    _publish: Callable[[bytes], Awaitable[None]] | None = None

    async def land(self, answer: Answer) -> None:
        """Publish the leader's answer to its followers, then let go (a follower: no-op)."""
        if self._publish is not None:
            await self._publish(_encode(answer))
            self.landed = True


class Flights:
    """The flights of one worker process's claude-call handlers."""

    def __init__(self, redis: Redis, keys: Keys, available: Availability, lease_ms: int) -> None:
        self._keys = keys
        self._available = available
        self._lease_ms = lease_ms
        self._join = load(redis, "flight_join")
        self._land = load(redis, "flight_land")
        self._hold = load(redis, "hold")

    @contextlib.asynccontextmanager
    async def board(self, routed: Routed, task_id: str) -> AsyncIterator[Flight]:
        """Follow the identical call in flight (the seat holds its answer), or lead one.

        A leader that leaves without landing (its call failed, or it was cancelled) lets
        go of the flight so that a follower leads instead.
        """
        ident = identity(routed)
        if ident is None:
            yield Flight()
            return
        keys = [self._keys.flight(ident), self._keys.flight_answer(ident)]
        answer = await self._wait_for_turn(keys, task_id)
        if answer is not None:
            yield Flight(answer=_as_follower(answer, routed))
            return
        flight = Flight(_publish=partial(self._publish, keys, task_id))
        renewing = asyncio.create_task(self._keep_lead(keys, task_id))
        try:
            yield flight
        finally:
            renewing.cancel()
            if not flight.landed:
                await asyncio.shield(self._publish(keys, task_id, b""))

    async def _wait_for_turn(self, keys: list[str], task_id: str) -> bytes | None:
        """The leader's packed answer, or None once this task leads."""
        pause = POLL_FIRST_S
        args: list[EncodableT] = [task_id, self._lease_ms, ""]
        while True:
            reply = as_list(await self._available.call(lambda: self._join(keys=keys, args=args)))
            kind = as_int(reply[0])
            if kind == _ANSWERED and isinstance(answer := reply[1], bytes):
                return answer
            if kind == _LEAD:
                return None
            if args[2] == "":  # following since now: only answers published later are ours
                args[2] = as_int(reply[1])
            await asyncio.sleep(pause)
            pause = min(POLL_MAX_S, pause * 1.5)

    async def _keep_lead(self, keys: list[str], task_id: str) -> None:
        """Every third of a lease, keep (or, had it lapsed unclaimed, retake) the lead."""
        args: list[EncodableT] = [task_id, self._lease_ms]
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            held = await self._available.call(lambda: self._hold(keys=keys[:1], args=args))
            if not held:
                log.warning("flight of task %s: lease lapsed, another task leads now", task_id)
                return

    async def _publish(self, keys: list[str], task_id: str, packed: bytes) -> None:
        """Let go of the flight, publishing the answer first (b"": none, the call failed)."""
        args: list[EncodableT] = [task_id, packed, ANSWER_TTL_MS]
        await self._available.call(lambda: self._land(keys=keys, args=args))


def _as_follower(packed: bytes, routed: Routed) -> Answer:
    """The leader's answer as this task's own: its request, served without a call."""
    return msgspec.structs.replace(
        _decode(packed), request=routed.request, cached=True, coalesced=True, attempts=0,
        call_ms=0,
    )  # fmt: skip
