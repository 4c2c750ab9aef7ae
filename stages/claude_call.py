"""claude-call: one Claude call per routed task, recorded before it is handed on (guarantee 5).

One input stream per model family (a lane each), since rate limits are per family. A task
whose answer is already recorded (a redelivery after a crash between the call and the
hand-off) is handed on from the record: Claude is never paid twice for it. Identical tasks
in flight at once share one call (`pipeline.flights`), and a call is made only once its
worst-case cost fits the budget (`pipeline.budget`): memo -> coalesce -> budget -> call ->
settle -> memo -> publish.
"""

from __future__ import annotations

import asyncio

import msgspec

from pipeline import Forward, Handler, Message, Outcome, Services, Settings, Stage
from pipeline.budget import Budget, Reservation
from pipeline.caller import Caller
from pipeline.flights import Flights
from pipeline.task import Answer, Routed

NAME = "claude-call"
#: Calls are I/O-bound (2-30 s each), so one process holds many at once: at 10M tasks/day
#: and ~5.7 s mean latency a family lane needs ~460 calls in flight; 256 per lane let the
#: Haiku lane queue (benchmarks/sustained.py). One process holds 2,200 at 1.65 ms CPU/call.
CONCURRENCY = 1024

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Answer).decode


async def build(services: Services) -> Handler:
    """One client per worker, its pool sized for every lane's calls at once."""
    settings = services.settings
    caller = Caller(services, pool_size(settings))
    services.on_close(caller.aclose)
    memo, ttl_s = services.memo, settings.results.ttl_s
    redis, keys, available = services.redis, services.keys, services.available
    flights = Flights(redis, keys, available, settings.runtime_for(NAME).lease_ms)
    budget = Budget(settings, redis, keys, available)

    async def handle(msg: Message) -> Outcome:
        routed = msg.body(Routed)
        recorded = await memo.get(msg.task_id)
        if recorded is not None:
            return Forward("store", _decode(recorded))
        async with flights.board(routed, msg.task_id) as flight:
            answer = flight.answer  # an identical call in flight answered for this task
            if answer is None:
                paid = await call_within_budget(routed, msg.attempt)
                if not isinstance(paid, Answer):
                    return paid
                answer = paid
            await memo.put(msg.task_id, _encode(answer), ttl_s)
            await flight.land(answer)
        return Forward("store", answer)

    async def call_within_budget(routed: Routed, attempt: int) -> Answer | Outcome:
        granted = await budget.reserve(routed)
        if not isinstance(granted, Reservation):
            return granted
        try:
            answer = await caller.call(granted.routed)
        except BaseException:
            await asyncio.shield(budget.release(granted))
            raise
        await budget.settle(granted, answer)
        return msgspec.structs.replace(answer, attempts=attempt)

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
