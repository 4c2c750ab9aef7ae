"""claude-call: one Claude call per routed task, recorded before it is handed on (guarantee 5).

One input stream per model family (a lane each), since rate limits are per family. A task
whose answer is already recorded (a redelivery after a crash between the call and the
hand-off) is handed on from the record: Claude is never paid twice for it.
"""

from __future__ import annotations

import msgspec

from pipeline import Forward, Handler, Message, Outcome, Services, Settings, Stage
from pipeline.caller import Caller
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

    async def handle(msg: Message) -> Outcome:
        routed = msg.body(Routed)
        recorded = await memo.get(msg.task_id)
        if recorded is not None:
            return Forward("store", _decode(recorded))
        answer = await caller.call(routed)
        answer = msgspec.structs.replace(answer, attempts=msg.attempt)
        await memo.put(msg.task_id, _encode(answer), ttl_s)
        return Forward("store", answer)

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
