"""store: the result hash it completes with, and which answers it puts in the response cache."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import msgspec
import pytest
from redis.asyncio import Redis

from pipeline import Complete, Keys, Message, Services, Settings, load_settings
from pipeline.request import parse_request
from pipeline.results import RESULT_FIELDS
from pipeline.task import Answer, Usage
from pipeline.wire import ENVELOPE_FIELD, decode_entry, encode_body, encode_envelope
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
    }
    assert outcome.ttl_s == settings.results.ttl_s


async def test_the_task_ttl_sets_the_result_ttl(client: Redis, settings: Settings) -> None:
    fields = {**FIELDS, "ttl": "120"}
    outcome = await run_store(client, settings, message(fields, answer(settings, fields)))
    assert outcome.ttl_s == 120


async def test_a_complete_answer_is_cached_without_its_prompt(
    client: Redis, settings: Settings
) -> None:
    fresh = answer(settings)
    await run_store(client, settings, message(FIELDS, fresh))
    raw = await cached_entry(client, settings, fresh.request.request_hash)
    assert raw is not None
    cached = msgspec.msgpack.decode(raw, type=Answer)
    assert (cached.output, cached.model, cached.usage) == ("spam", fresh.model, fresh.usage)
    assert cached.request.messages == [] and cached.request.metadata == "{}"
    assert cached.request.request_hash == fresh.request.request_hash
    ttl = await client.ttl(Keys(settings.prefix).cache(fresh.request.request_hash))
    assert settings.cache.ttl_s - 5 <= ttl <= settings.cache.ttl_s


async def test_stop_sequence_answers_are_complete_too(client: Redis, settings: Settings) -> None:
    fresh = answer(settings, stop_reason="stop_sequence")
    await run_store(client, settings, message(FIELDS, fresh))
    assert await cached_entry(client, settings, fresh.request.request_hash) is not None


@pytest.mark.parametrize(
    "stop_reason", ["max_tokens", "refusal", "pause_turn", "tool_use", "model_context_window"]
)
async def test_incomplete_answers_are_stored_but_not_cached(
    client: Redis, settings: Settings, stop_reason: str
) -> None:
    cut = answer(settings, stop_reason=stop_reason)
    outcome = await run_store(client, settings, message(FIELDS, cut))
    assert outcome.result is not None
    assert (outcome.result["status"], outcome.result["stop_reason"]) == ("completed", stop_reason)
    assert await cached_entry(client, settings, cut.request.request_hash) is None


async def test_an_empty_output_is_not_cached(client: Redis, settings: Settings) -> None:
    empty = answer(settings, output="")
    await run_store(client, settings, message(FIELDS, empty))
    assert await cached_entry(client, settings, empty.request.request_hash) is None


async def test_a_cache_hit_is_not_written_back(client: Redis, settings: Settings) -> None:
    hit = answer(settings, cached=True, attempts=0, call_ms=0)
    outcome = await run_store(client, settings, message(FIELDS, hit))
    assert outcome.result is not None
    assert (outcome.result["cached"], outcome.result["attempts"]) == ("true", "0")
    assert float(outcome.result["cost_usd"]) == 0
    assert outcome.result["input_tokens"] == "12", "a hit reports the usage as recorded"
    assert await cached_entry(client, settings, hit.request.request_hash) is None


async def test_cache_false_tasks_are_not_cached(client: Redis, settings: Settings) -> None:
    fields = {**FIELDS, "cache": "false"}
    fresh = answer(settings, fields)
    await run_store(client, settings, message(fields, fresh))
    assert await cached_entry(client, settings, fresh.request.request_hash) is None


async def test_nothing_is_cached_when_the_cache_is_off(
    client: Redis, fast_env: dict[str, str]
) -> None:
    settings = load_settings(env={**fast_env, "PIPELINE_CACHE__ENABLED": "false"})
    fresh = answer(settings)
    await run_store(client, settings, message(FIELDS, fresh))
    assert await cached_entry(client, settings, fresh.request.request_hash) is None
