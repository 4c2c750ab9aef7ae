"""claude-call: one paid Claude call per routed task, claimed before it is made and recorded
with its answer before it is handed on (guarantee 5).

One input stream per model family (a lane each), since rate limits are per family. The task's
record (`pipeline.claude.task_record`) decides first: an answer already recorded for this call is
handed on without paying (a redelivery after a crash), another live entry of the same task
means this one is a duplicate, and otherwise this entry claims the call. Then the budget
decides what may be sent (`pipeline.claude.budget`, maybe a downgrade), and only then may an
identical call in flight or a cached answer stand in for it (`pipeline.claude.flights`), so nothing
is shared across a budget decision. claim -> budget -> coalesce -> call -> record -> land.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec

from pipeline import Drop, Forward, Handler, Message, Outcome, Reject, Services, Settings, Stage
from pipeline.claude import (
    Answer,
    Budget,
    Caller,
    ClaimState,
    Flights,
    LeadLost,
    Reservation,
    Routed,
    TaskRecords,
    call_timeout_s,
)

NAME = "claude-call"
#: Calls are I/O-bound (2-30 s each), so one process holds many at once: at 10M tasks/day
#: and ~5.7 s mean latency a family lane needs ~460 calls in flight; 256 per lane let the
#: Haiku lane queue (benchmarks/sustained.py). One process holds 2,200 at 1.65 ms CPU/call.
CONCURRENCY = 1024


async def build(services: Services[Settings]) -> Handler:
    """One client per worker, its pool sized for every lane's calls at once."""
    settings = services.settings
    caller = Caller(services, pool_size(settings))
    services.on_close(caller.aclose)
    redis, keys, available = services.redis, services.keys, services.available
    records = TaskRecords.for_stage(services, NAME)
    flights = Flights(redis, keys, available, settings.runtime_for(NAME).lease_ms, settings)
    budget = Budget(settings, redis, keys, available)

    async def handle(msg: Message) -> Outcome:
        routed = msg.body(Routed)
        claim = await records.claim(msg, routed)
        if claim.state is ClaimState.RECORDED and claim.answer is not None:
            # A redelivery after its process died: the answer may never have landed.
            await flights.republish(routed, msg.task_id, claim.answer)
            return Forward("store", claim.answer.to_store())
        if claim.state is ClaimState.HELD:
            return Drop("another entry of this task holds its call")
        if claim.state is ClaimState.CONFLICT:
            return Reject(f"id {msg.task_id!r} already holds the answer to another request")
        granted = await budget.reserve(routed)
        if not isinstance(granted, Reservation):
            return granted
        async with flights.board(granted.routed, msg.task_id) as flight:
            answer, fence = flight.answer, 0
            while answer is None:  # this task leads
                try:
                    answer = await call(granted, msg, flight.confirm)
                    fence = claim.fence
                except LeadLost:  # its lease lapsed before the call went out: not paid
                    answer = await flight.follow()  # the new leader's answer, or it leads again
            if not fence:  # an identical call in flight, or the cache, answered
                await budget.release(granted)
            own = await records.record(msg.task_id, routed, answer, fence)
            await flight.land(answer)
        if own.state is ClaimState.GONE:
            return Drop("the task was answered and its result expired while this call ran")
        if own.answer is None:
            return Reject(f"id {msg.task_id!r} already holds the answer to another request")
        return Forward("store", own.answer.to_store())

    async def call(
        granted: Reservation, msg: Message, still_leads: Callable[[], Awaitable[None]]
    ) -> Answer:
        """The paid call, sent only while this task still leads its flight; once sent,
        shutdown lets it finish (bounded by its timeout)."""

        async def before_send() -> None:
            await still_leads()  # LeadLost: another task leads, or answered, now
            msg.finish_before_exit(call_timeout_s(granted.routed, settings.claude) + 5)

        try:
            answer = await caller.call(granted.routed, before_send=before_send)
        except LeadLost:
            raise  # not sent: the reservation stays, for the call this task may yet lead
        except BaseException:
            await asyncio.shield(budget.release(granted))
            raise
        await budget.settle(granted, answer)
        return msgspec.structs.replace(answer, attempts=msg.attempt)

    return handle


def lane_concurrency(settings: Settings) -> int:
    """Calls in flight per lane: `[stages.claude-call] concurrency`, else CONCURRENCY."""
    if "concurrency" in settings.stages.get(NAME, {}):
        return settings.runtime_for(NAME).concurrency
    return CONCURRENCY


def pool_size(settings: Settings) -> int:
    """Connections for every lane's calls at once (the lanes share one client)."""
    return lane_concurrency(settings) * len(settings.claude.models)


def stage(settings: Settings) -> Stage:
    """The stage with one lane per model family named in `settings.claude.models`."""
    lanes = tuple(settings.claude.models)
    return Stage(NAME, "call", build=build, lanes=lanes, concurrency=lane_concurrency(settings))


claude_call = stage(Settings())
