"""store: the last stage. Writes the task's result.

The runtime stores the result first-writer-wins with the task's TTL and adds the done event in
the same atomic step as the ack (guarantees 1 and 5); the task's record expires with it. The
hash is built by the runtime's one owner of result hashes (`pipeline.runtime.results`), which
also builds the `failed` ones, so the two kinds never drift apart. Every task is counted in the
cost ledger first, once per task id even if this entry is redelivered (its paid call was
counted when claude-call recorded it). The response cache was written as the answer landed
(`pipeline.claude.flights`).
"""

from __future__ import annotations

from pipeline import Complete, Handler, Message, Outcome, Services, Settings, Stage
from pipeline.claude import Answer, Ledger, micro_usd, usd
from pipeline.runtime import completed_result


async def build(services: Services[Settings]) -> Handler:
    """The handler, with this worker's cost ledger."""
    ledger = services.shared(Ledger.for_services)

    async def store(msg: Message) -> Outcome:
        answer = msg.body(Answer)
        charge = ledger.charge(answer)
        await ledger.record(msg.task_id, charge)
        result = completed_result(
            msg.envelope,
            output=answer.output,
            model=answer.model,
            input_tokens=answer.usage.input_tokens,
            output_tokens=answer.usage.output_tokens,
            cache_read_input_tokens=answer.usage.cache_read_input_tokens,
            cache_creation_input_tokens=answer.usage.cache_creation_input_tokens,
            cost_usd=usd(micro_usd(charge.spend_pico)),
            cached=answer.cached,
            stop_reason=answer.stop_reason,
            stop_sequence=answer.stop_sequence or "",
            content=answer.blocks_json(),
            usage=answer.usage_json(),
            message_id=answer.message_id,
            request_id=answer.request_id,
            attempts=answer.attempts,
            call_ms=answer.call_ms,
            metadata=answer.request.metadata,
        )
        return Complete(result)  # its TTL is the task's: the runtime resolves it as it writes

    return store


stage = Stage("store", "store", build=build)
