"""Coalescing: identical requests in flight at the same time make one Claude call (the "Paid
work is done once" guarantee).

The first task to take a flight's lease leads: it calls, renews the lease while it waits,
publishes its answer for a few seconds and lets go. Identical tasks arriving meanwhile
follow: they poll, backing off, for an answer published since they began to follow; a task
arriving after the answer leads a new flight (only the cache may reuse answers). A leader
that dies stops renewing and one whose call fails lets go without an answer; either way the
next follower to poll takes the lead, so nobody is stranded. A leader renews its lease by
asking as a follower since it began to lead would, and asks again just before its call goes
out unless it renewed lately: one whose lease lapsed unrenewed (a starved worker) while
another task took the lead, or answered, does not call but follows (`LeadLost`); only a
call already sent when the lease lapsed is paid twice, as a stalled worker's. Identity is
the request's canonical hash plus the model and max_tokens it is sent with, after routing
*and* the budget's decision, so a follower only ever shares the answer of exactly the
request it would have sent; a task with `cache=false` asked for a fresh answer, and a
downgraded one is not what its hash stands for: both fly alone.

The response cache lives next to the flights (same hash tag): the leader's answer lands in
the cache in the same step as it is published to its followers, and a task joining a flight
takes a cached answer first, so an identical request a moment after an answer landed is a
hit, not a second call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
from redis.asyncio import Redis
from redis.typing import EncodableT

from pipeline.claude.scripts import load
from pipeline.claude.settings import Settings
from pipeline.claude.task import Answer, Routed
from pipeline.claude.task_record import binding
from pipeline.runtime.keys import Keys
from pipeline.runtime.redis_conn import Availability
from pipeline.runtime.replies import as_int, as_list

log = logging.getLogger(__name__)

#: Followers poll for the answer from this often to this seldom (a call takes 2-30 s).
POLL_FIRST_S = 0.02
POLL_MAX_S = 0.5
#: How long a published answer waits for followers that have yet to poll.
ANSWER_TTL_MS = 15_000
#: How long a leader that never landed is remembered (`Keys.flight_led`): past its lease,
#: reclaim and redelivery, when its own redelivery republishes what it recorded.
LED_TTL_MS = 3_600_000

#: Stop reasons of a whole answer to its request, the same whoever asks it again: Claude
#: finished its turn, hit a stop sequence, or asked for a client tool (the agent runs it and
#: sends the result in a new request, which has a key of its own). Not cached: `max_tokens`
#: and `model_context_window_exceeded` (cut), `pause_turn` (a server tool's turn to be
#: continued), `refusal`, and any reason the API adds later until it is judged here.
COMPLETE_STOP_REASONS = frozenset({"end_turn", "stop_sequence", "tool_use"})

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
    non-empty answers of tasks that allow caching, for their type's TTL, and none that used
    a server tool (a web search's answer is of its moment)."""
    request = answer.request
    if not (
        settings.cache.enabled
        and request.cache
        and request.request_hash
        and not answer.cached
        and answer.stop_reason in COMPLETE_STOP_REASONS
        and (answer.output or answer.content)
        and not answer.usage.server_tool_requests
    ):
        return 0
    return settings.cache.ttl_for(request.type)


class LeadLost(Exception):
    """A leader's call was about to go out, but its lease had lapsed (a starved worker) and
    another task leads the flight now, or has answered it: not sent, so not paid. The task
    follows instead (`Flight.follow`)."""


@dataclass(slots=True)
class Flight:
    """A task's seat: a follower's holds the leader's `answer`; a leader calls and `land`s."""

    answer: Answer | None = None
    landed: bool = False
    _lead: _Lead | None = None

    async def confirm(self) -> None:
        """Just before a leader's call goes out: raise `LeadLost` unless this task still leads
        (a follower, or a task flying alone: no-op)."""
        if self._lead is not None and self.answer is None and not await self._lead.confirm():
            raise LeadLost(f"task {self._lead.task_id} no longer leads its flight")

    async def follow(self) -> Answer | None:
        """After `LeadLost`: wait for the answer of the task that leads now, as any follower
        does (the seat then holds it), or None once this task leads again."""
        assert self._lead is not None, "only a leader loses its lead"
        self.answer = await self._lead.follow()
        return self.answer

    async def land(self, answer: Answer) -> None:
        """Publish the leader's answer to its followers and the response cache, then let go
        (a follower: no-op)."""
        if self._lead is not None and self.answer is None:
            await self._lead.land(answer)
            self.landed = True


@dataclass(slots=True)
class _Turn:
    """What `flight_join.lua` said: `kind` and the `answer` (answered, cached), or this task
    leads, following since `since` (server µs), as asked at `asked_at` (monotonic)."""

    kind: int
    answer: bytes | None
    since: int
    asked_at: float
    leader: str = ""  # following: the task that leads; leading: one that led and never landed


class Flights:
    """The flights of one worker process's claude-call handlers."""

    def __init__(
        self, redis: Redis, keys: Keys, available: Availability, lease_ms: int, settings: Settings
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._keys = keys
        self._available = available
        self._lease_ms = lease_ms
        self._join = load(redis, "flight_join")
        self._land = load(redis, "flight_land")

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
        keys = self._keys_of(*ident)
        cacheable = bool(
            self._settings.cache.enabled and self._settings.cache.ttl_for(routed.request.type)
        )
        turn = await self._wait_for_turn(keys, task_id, cacheable, binding(routed))
        if turn.kind != _LEAD:
            yield Flight(answer=_served(turn, routed))
            return
        lead = _Lead(self, keys, task_id, cacheable, routed, turn)
        flight = Flight(_lead=lead)
        try:
            yield flight
        finally:
            lead.stop()
            if flight.answer is None and not flight.landed:
                await asyncio.shield(self._publish(keys, task_id, b"", 0))

    async def republish(self, routed: Routed, task_id: str, answer: Answer) -> None:
        """Publish an answer found recorded on a redelivery: its process died between
        recording it and landing its flight, so identical requests would miss it and pay
        again. Idempotent: the flight (if still this task's) is let go, the cache refreshed."""
        ident = identity(routed)
        if ident is None:
            return
        keys = self._keys_of(*ident)
        ttl_s = cache_ttl_s(answer, self._settings)
        await self._publish(keys, task_id, _encode(answer.bare()), ttl_s)

    def _keys_of(self, request_hash: str, call: str) -> list[str]:
        """The flight, its published answer, and the request's cache entry (one hash tag)."""
        return [
            self._keys.flight(request_hash, call),
            self._keys.flight_answer(request_hash, call),
            self._keys.cache(request_hash),
            self._keys.flight_led(request_hash, call),
        ]

    async def _wait_for_turn(
        self, keys: list[str], task_id: str, cacheable: bool, bound: str,
        since: int | None = None,
    ) -> _Turn:  # fmt: skip
        """Poll until answered, or this task leads. `since`: following since then (server µs),
        for a leader that lost its lead; None: from now on. `bound`: the call's binding.

        Taking over from a leader whose lease lapsed, it first looks at that leader's task
        record: a process killed after recording its answer, before landing its flight,
        left the answer there, and calling again would pay twice for it."""
        pause = POLL_FIRST_S
        leader = ""
        while True:
            turn = await self._ask(keys, task_id, cacheable, since)
            leader = turn.leader or leader  # who leads, or (now leading) who led and died
            if turn.kind == _LEAD and leader not in ("", task_id):
                packed = await self._recorded(leader, bound)
                if packed is not None:
                    answer = _decode(packed)
                    await self._publish(keys, task_id, packed, cache_ttl_s(answer, self._settings))
                    return _Turn(_ANSWERED, packed, turn.since, turn.asked_at)
            if turn.kind != 0:
                return turn
            if since is None:  # following since now: only answers published later are ours
                since = turn.since
            await asyncio.sleep(pause)
            pause = min(POLL_MAX_S, pause * 1.5)

    async def _recorded(self, task_id: str, bound: str) -> bytes | None:
        """The answer `task_id`'s record holds for the call `bound` names, if any."""
        key = self._keys.task(task_id)
        answer, req = await self._available.call(lambda: self._redis.hmget(key, "answer", "req"))
        if isinstance(answer, bytes) and req == bound.encode():
            return answer
        return None

    async def _ask(
        self, keys: list[str], task_id: str, cacheable: bool, since: int | None
    ) -> _Turn:
        """One `flight_join.lua`: answered, cached, lead (or still lead), or follow (kind 0)."""
        args: list[EncodableT] = [
            task_id, self._lease_ms, "" if since is None else since, "1" if cacheable else "0",
            LED_TTL_MS,
        ]  # fmt: skip
        asked_at = time.monotonic()
        reply = as_list(await self._available.call(lambda: self._join(keys=keys, args=args)))
        kind = as_int(reply[0])
        if kind in (_ANSWERED, _CACHED) and isinstance(answer := reply[1], bytes):
            return _Turn(kind, answer, since or 0, asked_at)
        began = as_int(reply[1]) if since is None else since
        # Following: who leads. Leading: who led before and left without landing (killed).
        leader = reply[2].decode() if len(reply) > 2 and isinstance(reply[2], bytes) else ""
        return _Turn(kind if kind == _LEAD else 0, None, began, asked_at, leader)

    async def _publish(
        self, keys: list[str], task_id: str, packed: bytes, cache_ttl_s: int
    ) -> None:
        """Let go of the flight, publishing the answer first (b"": none, the call failed)."""
        args: list[EncodableT] = [task_id, packed, ANSWER_TTL_MS, cache_ttl_s]
        await self._available.call(lambda: self._land(keys=keys, args=args))


class _Lead:
    """A leader's hold on its flight. Every third of a lease it asks `flight_join.lua` as a
    follower since it began to lead would: this renews its lease, or retakes it had it lapsed
    with nobody else leading and no answer published or cached since; otherwise the lead is
    lost. Before its call goes out it asks once more, unless it renewed less than two thirds
    of a lease ago (a lease cannot have lapsed since): a leader that sends its call after
    another task took over would pay twice for one request."""

    def __init__(
        self, flights: Flights, keys: list[str], task_id: str, cacheable: bool, routed: Routed,
        turn: _Turn,
    ) -> None:  # fmt: skip
        self.task_id = task_id
        self._flights = flights
        self._keys = keys
        self._cacheable = cacheable
        self._routed = routed
        self._since = turn.since
        self._held_at = turn.asked_at
        self._fresh_s = flights._lease_ms * 2 / 3000
        self._lost: _Turn | None = None  # the reply that ended the lead
        self._renewing = asyncio.create_task(self._keep())

    def stop(self) -> None:
        self._renewing.cancel()

    async def confirm(self) -> bool:
        """True if this task still leads (renewed, if it was not lately)."""
        if self._lost is not None:
            return False
        if time.monotonic() - self._held_at < self._fresh_s:
            return True
        return await self._renew()

    async def follow(self) -> Answer | None:
        """Once the lead is lost: the answer that ended it, or the new leader's; None once this
        task leads again (it renews again)."""
        self.stop()
        turn = self._lost
        if turn is None or turn.kind == 0:
            turn = await self._flights._wait_for_turn(
                self._keys, self.task_id, self._cacheable, binding(self._routed), self._since
            )
        if turn.kind == _LEAD:
            self._lost, self._held_at = None, turn.asked_at
            self._renewing = asyncio.create_task(self._keep())
            return None
        return _served(turn, self._routed)

    async def land(self, answer: Answer) -> None:
        self.stop()
        settings = self._flights._settings
        await self._flights._publish(
            self._keys, self.task_id, _encode(answer.bare()), cache_ttl_s(answer, settings)
        )

    async def _renew(self) -> bool:
        turn = await self._flights._ask(self._keys, self.task_id, self._cacheable, self._since)
        if turn.kind == _LEAD:
            self._held_at = max(self._held_at, turn.asked_at)
            return True
        if self._lost is None:
            self._lost = turn
            log.warning(
                "flight of task %s: lease lapsed, another task %s now",
                self.task_id, "leads" if turn.kind == 0 else "answered",
            )  # fmt: skip
        return False

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self._flights._lease_ms / 3000)
            if not await self._renew():
                return


def _served(turn: _Turn, routed: Routed) -> Answer:
    """A published or cached answer, as this task's."""
    assert turn.answer is not None
    return _decode(turn.answer).served_for(routed.request, coalesced=turn.kind == _ANSWERED)
