"""store: the result hash it completes with. It never writes the response cache: the flight
leader does, as its answer lands (tests/stages/test_coalescing.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import msgspec
import pytest
from redis.asyncio import Redis

from pipeline import Complete, Keys, Message, Services, Settings
from pipeline.claude.request import parse_request
from pipeline.claude.task import Answer, Usage
from pipeline.runtime.results import RESULT_FIELDS
from pipeline.runtime.wire import ENVELOPE_FIELD, decode_entry, encode_body, encode_envelope
from stages import store

pytestmark = pytest.mark.anyio
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
FIELDS = {"prompt": "Is this spam?", "type": "classify", "metadata": '{"order": 42}'}


@pytest.fixture
async def client(redis_url: str, anyio_backend: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url)
    yield redis
    await redis.aclose()


def answer(settings: Settings, fields: dict[str, str] = FIELDS, **changes: object) -> Answer:
    values: dict[str, object] = {
        "request": parse_request(fields, settings),
        "model": "claude-haiku-5-5",
        "output": "spam",
        "stop_reason": "end_turn",
        "usage": Usage(
            input_tokens=12,
            output_tokens=3,
            cache_creation_input_tokens=4,
            cache_read_input_tokens=5,
        ),
        "attempts": 1,
        "call_ms": 800,
    }
    values.update(changes)
    return Answer(**values)  # type: ignore[arg-type]


def message(fields: dict[str, str], body: Answer, age_ms: int = 0) -> Message:
    """The store's input as the runtime hands it over: the producer's fields, the Answer."""
    entry_id = f"{int(time.time() * 1000) - age_ms}-0"
    ingress = decode_entry(entry_id, {k.encode(): v.encode() for k, v in fields.items()}, 1 << 22)
    packed = encode_envelope(msgspec.structs.replace(ingress, body=encode_body(body)))
    envelope = decode_entry(entry_id, {ENVELOPE_FIELD: packed}, 1 << 22)
    return Message(envelope, entry_id, "store", None, 1)


async def run_store(client: Redis, settings: Settings, msg: Message) -> Complete:
    handler = await store.build(Services(settings, client, Keys(settings.prefix)))
    outcome = await handler(msg)
    assert isinstance(outcome, Complete)
    assert outcome.result is not None
    return outcome


async def cached_entry(client: Redis, settings: Settings, request_hash: str) -> bytes | None:
    value = await client.get(Keys(settings.prefix).cache(request_hash))
    return bytes(value) if value is not None else None


async def test_a_fresh_answer_completes_with_every_result_field(
    client: Redis, settings: Settings
) -> None:
    fields = {**FIELDS, "traceparent": TRACEPARENT}
    outcome = await run_store(client, settings, message(fields, answer(settings), age_ms=1500))
    result = dict(outcome.result or {})
    assert set(RESULT_FIELDS) <= set(result)
    latency = int(result.pop("latency_ms"))
    assert 1500 <= latency < 10_000
    assert result == {
        "status": "completed",
        "output": "spam",
        "model": "claude-haiku-5-5",
        "input_tokens": "12",
        "output_tokens": "3",
        "cache_creation_input_tokens": "4",
        "cache_read_input_tokens": "5",
        # haiku at $1/$5 per MTok: 12 in + 3 out + 4 cache writes x1.25 + 5 reads x0.1
        "cost_usd": "0.000032",
        "call_ms": "800",
        "cached": "false",
        "stop_reason": "end_turn",
        "error": "",
        "attempts": "1",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "metadata": '{"order": 42}',
        "stop_sequence": "",
        "content": '[{"type":"text","text":"spam"}]',
        # An answer recorded before the API's usage was kept whole: rebuilt from its counts.
        "usage": (
            '{"input_tokens":12,"output_tokens":3,"cache_creation_input_tokens":4,'
            '"cache_read_input_tokens":5,"cache_creation":{"ephemeral_5m_input_tokens":4,'
            '"ephemeral_1h_input_tokens":0}}'
        ),
        "message_id": "",
        "request_id": "",
    }
    # The task's own TTL, resolved by the runtime as it writes every result (the `ttl`
    # field's effect end to end: tests/stages/test_cache_check.py, through the runtime).
    assert outcome.ttl_s is None


async def test_the_result_keeps_the_whole_reply_content_blocks_usage_and_ids(
    client: Redis, settings: Settings
) -> None:
    blocks = (
        '[{"type":"thinking","thinking":"hm","signature":"c2ln"},{"type":"text","text":"Let '
        'me look."},{"type":"tool_use","id":"toolu_1","name":"lookup","input":{"q":"x"}}]'
    )
    usage = '{"input_tokens":12,"output_tokens":3,"server_tool_use":null,"service_tier":"standard"}'
    reply = answer(
        settings,
        output="Let me look.",
        content=blocks,
        stop_reason="tool_use",
        stop_sequence=None,
        api_usage=usage,
        message_id="msg_01",
        request_id="req_01",
    )
    result = dict((await run_store(client, settings, message(FIELDS, reply))).result or {})
    assert (result["content"], result["usage"], result["output"]) == (blocks, usage, "Let me look.")
    assert (result["stop_reason"], result["message_id"], result["request_id"]) == (
        "tool_use", "msg_01", "req_01",
    )  # fmt: skip
    stopped = answer(settings, stop_reason="stop_sequence", stop_sequence="END")
    result = dict((await run_store(client, settings, message(FIELDS, stopped))).result or {})
    assert (result["stop_reason"], result["stop_sequence"]) == ("stop_sequence", "END")


async def test_the_store_never_writes_the_response_cache(client: Redis, settings: Settings) -> None:
    """Not even for a complete, fresh, cacheable answer: the cache was written as it landed."""
    for stop_reason in ("end_turn", "stop_sequence"):
        fresh = answer(settings, stop_reason=stop_reason)
        await run_store(client, settings, message(FIELDS, fresh))
        assert await cached_entry(client, settings, fresh.request.request_hash) is None
    assert await client.keys(f"{settings.prefix}:cache:*") == []


async def test_the_task_is_marked_counted_in_its_record(client: Redis, settings: Settings) -> None:
    """The ledger's once-per-task mark lives in the task's record (which the hand-off of the
    result then expires with the result)."""
    msg = message({**FIELDS, "id": "t-7"}, answer(settings))
    await run_store(client, settings, msg)
    await run_store(client, settings, msg)
    record = Keys(settings.prefix).task("t-7")
    assert await client.hgetall(record) == {b"counted": b"1"}
    live = settings.results.live_ttl_s  # until the hand-off gives it the result's TTL
    assert live - 60 < await client.ttl(record) <= live


@pytest.mark.parametrize(
    "stop_reason", ["max_tokens", "refusal", "pause_turn", "tool_use", "model_context_window"]
)
async def test_incomplete_answers_are_stored_as_completed(
    client: Redis, settings: Settings, stop_reason: str
) -> None:
    """Completed with their stop reason (whether one is cached is the flight's rule)."""
    cut = answer(settings, stop_reason=stop_reason)
    outcome = await run_store(client, settings, message(FIELDS, cut))
    assert outcome.result is not None
    assert (outcome.result["status"], outcome.result["stop_reason"]) == ("completed", stop_reason)
    assert outcome.result["output"] == "spam"


async def test_a_cache_hit_completes_at_no_cost(client: Redis, settings: Settings) -> None:
    hit = answer(settings, cached=True, attempts=0, call_ms=0)
    outcome = await run_store(client, settings, message(FIELDS, hit))
    assert outcome.result is not None
    assert (outcome.result["cached"], outcome.result["attempts"]) == ("true", "0")
    assert float(outcome.result["cost_usd"]) == 0
    assert outcome.result["input_tokens"] == "12", "a hit reports the usage as recorded"
