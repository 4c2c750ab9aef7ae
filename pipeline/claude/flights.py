"""Coalescing: identical requests in flight at the same time make one Claude call (the "Paid
work is done once" guarantee).

The first task to take a flight's lease leads: it calls, renews the lease while it waits,
publishes its answer for a few seconds and lets go. Identical tasks arriving meanwhile
follow: they poll, backing off, for an answer published since they began to follow; a task
arriving after the answer leads a new flight (only the cache may reuse answers). A leader
that dies stops renewing and one whose call fails lets go without an answer; either way the
next follower to poll takes the lead, so nobody is stranded. Identity is the request's
canonical hash plus the model and max_tokens it is sent with, after routing *and* the budget's
decision, so a follower only ever shares the answer of exactly the request it would have
sent; a task with `cache=false` asked for a fresh answer, and a downgraded one is not what
its hash stands for: both fly alone.

The response cache lives next to the flights (same hash tag): the leader's answer lands in
the cache in the same step as it is published to its followers, and a task joining a flight
takes a cached answer first, so an identical request a moment after an answer landed is a
hit, not a second call.
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

from pipeline.claude.scripts import load
from pipeline.claude.settings import Settings
from pipeline.claude.task import Answer, Routed
from pipeline.runtime import scripts as runtime_scripts
from pipeline.runtime.keys import Keys
from pipeline.runtime.redis_conn import Availability
from pipeline.runtime.replies import as_int, as_list

log = logging.getLogger(__name__)

#: Followers poll for the answer from this often to this seldom (a call takes 2-30 s).
POLL_FIRST_S = 0.02
POLL_MAX_S = 0.5
#: How long a published answer waits for followers that have yet to poll.
ANSWER_TTL_MS = 15_000

#: Stop reasons of an answer Claude finished by itself (not cut by max_tokens, not refused).
COMPLETE_STOP_REASONS = frozenset({"end_turn", "stop_sequence"})

_ANSWERED, _LEAD, _CACHED = 1, 2, 3
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Answer).decode


def identity(routed: Routed) -> tuple[str, str] | None:
    """What makes two tasks' calls the same one, as (request hash, model and max_tokens);
    None for a task that must call alone."""
    request = routed.request
    if not request.cache or not request.request_hash:
        return None
    return request.request_hash, f"{routed.model}:{routed.max_tokens}"


def cache_ttl_s(answer: Answer, settings: Settings) -> int:
    """How long the response cache keeps `answer` (0: not at all). Only complete, fresh,
    non-empty answers of tasks that allow caching, for their type's TTL."""
    request = answer.request
    if not (
        settings.cache.enabled
        and request.cache
        and request.request_hash
        and not answer.cached
        and answer.stop_reason in COMPLETE_STOP_REASONS
        and answer.output
    ):
        return 0
    return settings.cache.ttl_for(request.type)


@dataclass(slots=True)
class Flight:
    """A task's seat: a follower's holds the leader's `answer`; a leader calls and `land`s."""

    answer: Answer | None = None
    landed: bool = False
    _publish: Callable[[bytes, int], Awaitable[None]] | None = None
    _settings: Settings | None = None

    async def land(self, answer: Answer) -> None:
        """Publish the leader's answer to its followers and the response cache, then let go
        (a follower: no-op)."""
        if self._publish is not None and self._settings is not None:
            await self._publish(_encode(answer.bare()), cache_ttl_s(answer, self._settings))
            self.landed = True


class Flights:
    """The flights of one worker process's claude-call handlers."""

    def __init__(
        self, redis: Redis, keys: Keys, available: Availability, lease_ms: int, settings: Settings
    ) -> None:
        self._settings = settings
        self._keys = keys
        self._available = available
        self._lease_ms = lease_ms
        self._join = load(redis, "flight_join")
        self._land = load(redis, "flight_land")
        self._hold = runtime_scripts.load(redis, "hold")

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
        request_hash, call = ident
        keys = [
            self._keys.flight(request_hash, call),
            self._keys.flight_answer(request_hash, call),
            self._keys.cache(request_hash),
        ]
        cacheable = self._settings.cache.enabled and self._settings.cache.ttl_for(
            routed.request.type
        )
        joined = await self._wait_for_turn(keys, task_id, bool(cacheable))
        if joined is not None:
            kind, packed = joined
            answer = _decode(packed).served_for(routed.request, coalesced=kind == _ANSWERED)
            yield Flight(answer=answer)
            return
        flight = Flight(_publish=partial(self._publish, keys, task_id), _settings=self._settings)
        renewing = asyncio.create_task(self._keep_lead(keys, task_id))
        try:
            yield flight
        finally:
            renewing.cancel()
            if not flight.landed:
                await asyncio.shield(self._publish(keys, task_id, b"", 0))

    async def _wait_for_turn(
        self, keys: list[str], task_id: str, cacheable: bool
    ) -> tuple[int, bytes] | None:
        """(how it was answered, the packed answer), or None once this task leads."""
        pause = POLL_FIRST_S
        args: list[EncodableT] = [task_id, self._lease_ms, "", "1" if cacheable else "0"]
        while True:
            reply = as_list(await self._available.call(lambda: self._join(keys=keys, args=args)))
            kind = as_int(reply[0])
            if kind in (_ANSWERED, _CACHED) and isinstance(answer := reply[1], bytes):
                return kind, answer
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

    async def _publish(
        self, keys: list[str], task_id: str, packed: bytes, cache_ttl_s: int
    ) -> None:
        """Let go of the flight, publishing the answer first (b"": none, the call failed)."""
        args: list[EncodableT] = [task_id, packed, ANSWER_TTL_MS, cache_ttl_s]
        await self._available.call(lambda: self._land(keys=keys, args=args))
