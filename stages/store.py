"""store: the last stage. Writes the task's result and caches complete answers.

The runtime stores the result first-writer-wins with its TTL and adds the done event in the
same atomic step as the ack (guarantees 1 and 5). Only complete, successful, fresh answers
of tasks that allow caching go into the response cache (cost control). Every answer is
charged to the cost ledger first, once per task id even if this entry is redelivered.
"""

from __future__ import annotations

import time

import msgspec

from pipeline import Complete, Handler, Message, Outcome, Services, Settings, Stage
from pipeline.pricing import micro_usd, usd
from pipeline.results import make_result, result_ttl, trace_id_of
from pipeline.task import Answer, Request

#: Stop reasons of an answer Claude finished by itself (not cut by max_tokens, not refused).
COMPLETE_STOP_REASONS = frozenset({"end_turn", "stop_sequence"})


async def build(services: Services) -> Handler:
    """The handler, with this worker's settings and response cache."""
    settings, cache, ledger = services.settings, services.cache, services.ledger

    async def store(msg: Message) -> Outcome:
        answer = msg.body(Answer)
        charge = ledger.charge(answer)
        await ledger.record(msg.task_id, charge)
        if _cacheable(answer, settings):
            ttl_s = settings.cache.ttl_for(answer.request.type)
            await cache.put(answer.request.request_hash, _cache_entry(answer), ttl_s)
        result = make_result(
            "completed",
            output=answer.output,
            model=answer.model,
            input_tokens=answer.usage.input_tokens,
            output_tokens=answer.usage.output_tokens,
            cache_read_input_tokens=answer.usage.cache_read_input_tokens,
            cache_creation_input_tokens=answer.usage.cache_creation_input_tokens,
            cost_usd=usd(micro_usd(charge.spend_pico)),
            cached=answer.cached,
            stop_reason=answer.stop_reason,
            attempts=answer.attempts,
            latency_ms=max(0, int(time.time() * 1000) - msg.envelope.origin_ms),
            call_ms=answer.call_ms,
            trace_id=trace_id_of(msg.envelope.traceparent),
            metadata=answer.request.metadata,
        )
        return Complete(result, ttl_s=result_ttl(msg.fields, settings.results.ttl_s))

    return store


def _cacheable(answer: Answer, settings: Settings) -> bool:
    request = answer.request
    return (
        settings.cache.enabled
        and request.cache
        and bool(request.request_hash)
        and not answer.cached
        and answer.stop_reason in COMPLETE_STOP_REASONS
        and bool(answer.output)
    )


def _cache_entry(answer: Answer) -> bytes:
    """The answer without its prompt (a hit brings its own request) or producer metadata."""
    bare = Request(messages=[], request_hash=answer.request.request_hash)
    return msgspec.msgpack.encode(msgspec.structs.replace(answer, request=bare))


stage = Stage("store", "store", build=build)
