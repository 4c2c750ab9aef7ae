"""store: the last stage. Writes the task's result.

The runtime stores the result first-writer-wins with its TTL and adds the done event in the
same atomic step as the ack (guarantees 1 and 5); the task's record expires with it. Every
task is counted in the cost ledger first, once per task id even if this entry is redelivered
(its paid call was counted when claude-call recorded it). The response cache was written as
the answer landed (`pipeline.claude.flights`).
"""

from __future__ import annotations

import time

from pipeline import Complete, Handler, Message, Outcome, Services, Settings, Stage
from pipeline.claude import Answer, Ledger, micro_usd, usd
from pipeline.runtime import make_result, result_ttl
from pipeline.runtime.traceparent import trace_id_of


async def build(services: Services[Settings]) -> Handler:
    """The handler, with this worker's settings and response cache."""
    settings, ledger = services.settings, services.shared(Ledger.for_services)

    async def store(msg: Message) -> Outcome:
        answer = msg.body(Answer)
        charge = ledger.charge(answer)
        await ledger.record(msg.task_id, charge)
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


stage = Stage("store", "store", build=build)
