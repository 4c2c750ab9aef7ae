"""claude-call and the Claude adapter, against a real Redis and the fake Anthropic API.

The SDK is never patched: faults come from the fake (429 from its rate limits, 529/500 from
its fault rates, 401/403 from its key lists, timeouts from its latency).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import msgspec
import pytest
import redis
from redis.asyncio import Redis

from pipeline import (
    App,
    AuthError,
    Complete,
    Forward,
    Keys,
    Message,
    Outcome,
    PermanentError,
    Reject,
    Services,
    Settings,
    Stage,
    TransientError,
    load_settings,
)
from pipeline.claude.api import call, make_client, retry_after_s
from pipeline.claude.ledger import read_days
from pipeline.claude.settings import ClaudeSettings
from pipeline.claude.task import Answer, Request, Routed
from pipeline.claude.task_record import binding
from pipeline.fake_claude import FakeClaudeConfig, FakeClaudeServer, run_fake_claude_in_thread
from pipeline.fake_claude.prompt import request_key
from pipeline.runtime.redis_conn import connect
from pipeline.runtime.wire import ENVELOPE_FIELD, decode_entry, encode_body, encode_envelope
from stages import claude_call
from tests.conftest import StartFake
from tests.helpers.outcomes import tally
from tests.helpers.redis_server import free_port
from tests.helpers.workers import Workers, wait_until

pytestmark = pytest.mark.anyio
KEY = "sk-test-4f1b2c"
PROMPT = "SECRET-PROMPT: summarise the quarterly numbers"
HAIKU = "claude-haiku-5-5"


def routed(prompt: str = PROMPT, max_tokens: int = 64, **request: Any) -> Routed:
    req = Request(messages=[{"role": "user", "content": prompt}], **request)
    return Routed(request=req, family="haiku", model=HAIKU, max_tokens=max_tokens)


@contextlib.asynccontextmanager
async def client_for(
    server: FakeClaudeServer | str, api_key: str | None = KEY, concurrency: int = 8, **claude: Any
) -> AsyncIterator[anthropic.AsyncAnthropic]:
    base_url = server if isinstance(server, str) else server.base_url
    settings = ClaudeSettings(base_url=base_url, **claude)
    client = make_client(settings, concurrency, api_key=api_key)
    try:
        yield client
    finally:
        await client.close()


async def failure(server: FakeClaudeServer | str, body: Routed, **kwargs: Any) -> Exception:
    """The pipeline error one call raises (the test fails if the call succeeds)."""
    async with client_for(server, **kwargs) as client:
        with pytest.raises((TransientError, PermanentError, AuthError)) as info:
            await call(client, body, auth_pause_s=7.5)
    exc = info.value
    assert KEY not in str(exc) and "SECRET-PROMPT" not in str(exc)
    return exc


# ---- the adapter ------------------------------------------------------------------------


async def test_a_call_returns_the_answer_with_all_usage_fields(start_fake: StartFake) -> None:
    fake = start_fake()
    system = [
        {"type": "text", "text": "You are terse. " * 40, "cache_control": {"type": "ephemeral"}}
    ]
    body = routed(max_tokens=5, system=system, temperature=0.25)
    async with client_for(fake) as client:
        first = await call(client, body)
        second = await call(client, body)
    assert first.output.startswith("fake-claude:")
    assert first.model == HAIKU and first.request == body.request
    assert first.stop_reason == "max_tokens"  # the fake writes >= 20 tokens; we allowed 5
    assert first.usage.output_tokens == 5
    assert first.usage.input_tokens > 0
    assert first.usage.cache_creation_input_tokens > 0  # cache_control passed through
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert first.call_ms >= 0 and first.attempts == 0 and not first.cached
    stats = fake.stats()
    assert stats["usage"]["input_tokens"] == first.usage.input_tokens + second.usage.input_tokens
    # The exact body the API saw: system blocks untouched, temperature in, nothing else.
    sent = {
        "model": HAIKU,
        "max_tokens": 5,
        "messages": body.request.messages,
        "system": system,
        "temperature": 0.25,
    }
    assert stats["calls_by_request"] == {request_key(sent): 2}


async def test_the_sdks_own_span_is_off_unless_its_variable_asks_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each call is traced once, as the worker's `chat` span."""
    monkeypatch.delenv("ANTHROPIC_OPEN_TELEMETRY", raising=False)
    async with client_for("http://127.0.0.1:9") as client:
        assert client.open_telemetry["traces"]["enabled"] is False
    monkeypatch.setenv("ANTHROPIC_OPEN_TELEMETRY", "true")
    async with client_for("http://127.0.0.1:9") as client:
        assert client.open_telemetry["traces"]["enabled"] is True


async def test_429_is_transient_with_retry_after_from_the_header(start_fake: StartFake) -> None:
    fake = start_fake(rpm=1)
    async with client_for(fake) as client:
        await call(client, routed("one"))
        with pytest.raises(TransientError) as info:
            await call(client, routed("two"))
    assert "429" in str(info.value) and "rate_limit_error" in str(info.value)
    # rpm=1: the bucket refills in up to 60 s; the fake rounds retry-after up to whole seconds.
    assert info.value.retry_after_s is not None
    assert 1.0 <= info.value.retry_after_s <= 60.0
    assert info.value.retry_after_s == int(info.value.retry_after_s)


def test_retry_after_headers_are_read_as_seconds() -> None:
    assert retry_after_s(httpx2.Headers({"retry-after": "12"})) == 12.0
    assert retry_after_s(httpx2.Headers({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    assert retry_after_s(httpx2.Headers({"retry-after": "soon"})) is None
    assert retry_after_s(httpx2.Headers({})) is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 28 <= (retry_after_s(httpx2.Headers({"retry-after": date})) or 0) <= 30


@pytest.mark.parametrize(
    ("fault", "status", "kind"),
    [
        ({"overloaded_rate": 1.0}, "529", "overloaded_error"),
        ({"server_error_rate": 1.0}, "500", "api_error"),
    ],
)
async def test_5xx_is_transient(
    start_fake: StartFake, fault: dict[str, float], status: str, kind: str
) -> None:
    exc = await failure(start_fake(**fault), routed())
    assert isinstance(exc, TransientError)
    assert status in str(exc) and kind in str(exc)
    assert exc.retry_after_s is None  # the fake sends no retry-after with these


async def test_a_timeout_is_transient(start_fake: StartFake) -> None:
    exc = await failure(start_fake(latency_ms=3000), routed(), timeout_s=0.3)
    assert isinstance(exc, TransientError) and "timed out" in str(exc)


async def test_a_refused_connection_is_transient() -> None:
    exc = await failure(f"http://127.0.0.1:{free_port()}", routed())
    assert isinstance(exc, TransientError) and "connection error" in str(exc)


async def test_400_is_permanent_with_the_apis_message(start_fake: StartFake) -> None:
    exc = await failure(start_fake(), routed(temperature=5.0))
    assert type(exc) is PermanentError
    assert "400 invalid_request_error" in str(exc)
    assert "temperature: Input should be between 0 and 1" in str(exc)
    assert "request-id req_fake" in str(exc)


async def test_404_and_413_are_permanent(start_fake: StartFake) -> None:
    fake = start_fake(max_body_bytes=200)
    missing = await failure(f"{fake.base_url}/nowhere", routed())
    assert type(missing) is PermanentError and "404 not_found_error" in str(missing)
    too_big = await failure(fake, routed("x" * 500))
    assert type(too_big) is PermanentError and "413 request_too_large" in str(too_big)


@pytest.mark.parametrize(
    ("keys", "status"), [({"bad_keys": [KEY]}, "401"), ({"forbidden_keys": [KEY]}, "403")]
)
async def test_refused_credentials_are_auth_errors(
    start_fake: StartFake, keys: dict[str, list[str]], status: str
) -> None:
    exc = await failure(start_fake(**keys), routed())
    assert isinstance(exc, AuthError) and status in str(exc)
    assert exc.pause_s == 7.5


async def test_no_key_at_all_is_an_auth_error_without_a_request(start_fake: StartFake) -> None:
    fake = start_fake()
    exc = await failure(fake, routed(), api_key=None)
    assert isinstance(exc, AuthError) and "ANTHROPIC_API_KEY" in str(exc)
    assert fake.stats()["requests_total"] == 0


async def test_the_key_may_come_from_the_environment(
    start_fake: StartFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = start_fake(bad_keys=["sk-wrong"])
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    async with client_for(fake, api_key=None) as client:
        assert (await call(client, routed())).output


async def test_the_pool_holds_exactly_concurrency_calls(start_fake: StartFake) -> None:
    """Sized by us: more than aiohttp's usual 100, and no more than asked for."""
    fake = start_fake(latency_ms=600)
    async with client_for(fake, concurrency=150) as client:
        await asyncio.gather(*(call(client, routed(f"task {i}")) for i in range(200)))
    stats = fake.stats()
    assert stats["succeeded"] == 200
    assert stats["inflight_max"] == 150


# ---- the stage --------------------------------------------------------------------------


def stage_settings(settings: Settings, fake: FakeClaudeServer) -> Settings:
    claude = msgspec.structs.replace(settings.claude, base_url=fake.base_url, auth_pause_s=4.0)
    return msgspec.structs.replace(settings, claude=claude)


async def paid_calls(aredis: Redis, keys: Keys) -> int:
    """Paid calls counted in today's cost ledger (every model and type)."""
    today = datetime.datetime.now(datetime.UTC).date()
    return sum(row.totals.requests for row in (await read_days(aredis, keys, [today])).rows)


def message(body: Routed, task_id: str = "task-1", attempt: int = 1) -> Message:
    """claude-call's input as the runtime hands it over."""
    entry_id = f"{int(time.time() * 1000)}-0"
    fields = {b"prompt": PROMPT.encode(), b"id": task_id.encode()}
    ingress = decode_entry(entry_id, fields, 1 << 22)
    env = msgspec.structs.replace(ingress, attempt=attempt, body=encode_body(body))
    packed = decode_entry(entry_id, {ENVELOPE_FIELD: encode_envelope(env)}, 1 << 22)
    return Message(packed, entry_id, "claude-call", "haiku", attempt)


async def test_the_answer_is_recorded_before_the_hand_off_and_never_paid_twice(
    start_fake: StartFake, aredis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    fake = start_fake()
    services = Services(stage_settings(settings, fake), aredis, Keys(settings.prefix))
    handle = await claude_call.build(services)
    try:
        first_msg = message(routed(), attempt=2)
        first = await handle(first_msg)
        assert isinstance(first, Forward) and first.to == "store"
        answer = first.body
        assert isinstance(answer, Answer) and answer.attempts == 2 and answer.output
        keys = Keys(settings.prefix)
        record = await aredis.hgetall(keys.task("task-1"))
        assert b"answer" in record, "the answer must be recorded before the handler returns"
        # Recorded without the prompt, bound to the call it answered, under this entry's claim.
        assert PROMPT.encode() not in record[b"answer"]
        assert msgspec.msgpack.decode(record[b"answer"], type=Answer) == answer.bare()
        assert record[b"req"] == binding(routed()).encode()
        assert (record[b"fence"], record[b"holder"]) == (b"1", first_msg.lease_token().encode())
        ttl = await aredis.ttl(keys.task("task-1"))  # no result yet: a live task's TTL
        assert settings.results.live_ttl_s - 60 < ttl <= settings.results.live_ttl_s
        assert fake.stats()["requests_total"] == 1
        assert await paid_calls(aredis, keys) == 1, "the paid call is counted as it is recorded"

        # A redelivery (say the worker died before its hand-off) reuses the record.
        again = await handle(message(routed(), attempt=3))
        assert again == Forward("store", answer)
        assert fake.stats()["requests_total"] == 1
        assert await paid_calls(aredis, keys) == 1
        assert await aredis.hget(keys.task("task-1"), "fence") == b"1", "no new claim"

        # The same id asked something else (another request hash): refused, and the
        # recorded answer stays.
        other = await handle(message(routed("other", request_hash="hash-of-other"), attempt=4))
        assert isinstance(other, Reject) and "another request" in other.reason
        assert fake.stats()["requests_total"] == 1
        assert await aredis.hget(keys.task("task-1"), "answer") == record[b"answer"]

        # Another task id is a new call.
        await handle(message(routed(), task_id="task-2"))
        assert fake.stats()["requests_total"] == 2
    finally:
        await services.aclose()


async def test_refused_credentials_raise_auth_error_and_record_nothing(
    start_fake: StartFake, aredis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    fake = start_fake(bad_keys=[KEY])
    services = Services(stage_settings(settings, fake), aredis, Keys(settings.prefix))
    handle = await claude_call.build(services)
    try:
        with pytest.raises(AuthError) as info:
            await handle(message(routed()))
        assert info.value.pause_s == 4.0
        keys = Keys(settings.prefix)
        assert await aredis.hmget(keys.task("task-1"), "answer", "req") == [None, None]
        assert await paid_calls(aredis, keys) == 0
    finally:
        await services.aclose()


async def test_a_burst_larger_than_the_redis_pool_waits_instead_of_failing(
    start_fake: StartFake, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """60 handlers at once on the worker's own kind of pool, of 4 connections."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    fake = start_fake(latency_ms=20)
    small = msgspec.structs.replace(settings.redis, max_connections=4)
    settings = msgspec.structs.replace(stage_settings(settings, fake), redis=small)
    pool = connect(small)
    services = Services(settings, pool, Keys(settings.prefix))
    handle = await claude_call.build(services)
    try:
        msgs = [message(routed(f"task {i}"), task_id=f"burst-{i}") for i in range(60)]
        outcomes = await asyncio.gather(*(handle(m) for m in msgs))
        assert all(isinstance(o, Forward) for o in outcomes)
        again = await asyncio.gather(*(handle(m) for m in msgs))  # all from their records
        assert again == outcomes
        assert fake.stats()["requests_total"] == 60
    finally:
        await services.aclose()
        await pool.aclose()


def test_lanes_follow_the_configured_families() -> None:
    assert claude_call.claude_call.lanes == ("haiku", "sonnet", "opus")
    assert claude_call.claude_call.name == "claude-call"
    settings = load_settings(
        env={}, claude__models={"small": "m-1", "big": "m-2"}, router__default_family="big",
        router__rules=[], stages={"claude-call": {"concurrency": 500}},
    )  # fmt: skip
    stage = claude_call.stage(settings)
    assert stage.lanes == ("small", "big")
    assert stage.concurrency == 500
    assert claude_call.pool_size(settings) == 1000
    assert claude_call.pool_size(Settings()) == 3 * claude_call.CONCURRENCY


# ---- a real worker ----------------------------------------------------------------------


async def ingest(msg: Message) -> Outcome:
    """Stands in for cache-check + router: odd tasks to sonnet, even ones to haiku."""
    n = int(msg.fields["n"])
    family = "haiku" if n % 2 == 0 else "sonnet"
    request = Request(messages=[{"role": "user", "content": f"task {n}: {msg.fields['prompt']}"}])
    body = Routed(request=request, family=family, model=f"claude-{family}-5-5", max_tokens=32)
    return Forward("claude-call", body, lane=family)


async def store(msg: Message) -> Outcome:
    answer = msg.body(Answer)
    return Complete(
        {"status": "completed", "output": answer.output, "attempts": str(answer.attempts)}
    )


app = App(
    [Stage("ingest", "tasks", ingest), claude_call.claude_call, Stage("store", "store", store)]
)


def test_a_worker_completes_every_task_through_529s_paying_once_each(
    fast_env: dict[str, str], prefix: str, rclient: redis.Redis, tmp_path: Path
) -> None:
    n = 60
    with run_fake_claude_in_thread(
        FakeClaudeConfig(overloaded_rate=0.2, latency_ms=50, seed=7)
    ) as fake:
        env = {
            **fast_env,
            "ANTHROPIC_API_KEY": KEY,
            "PIPELINE_CLAUDE__BASE_URL": fake.base_url,
            "PIPELINE_RETRY__MAX_ATTEMPTS": "12",  # 0.2**12: no task runs out of tries
        }
        workers = Workers(env, tmp_path, app=f"{__name__}:app")
        try:
            workers.start()
            keys = Keys(prefix)
            for i in range(n):
                rclient.xadd(keys.ingress, {"n": str(i), "prompt": "hello", "id": f"t{i}"})
            wait_until(lambda: rclient.xlen(keys.done) >= n, timeout=60, what="all tasks done")
        finally:
            workers.stop_all()
        stats = fake.stats()
    result = tally(rclient, prefix)
    ids = [f"t{i}" for i in range(n)]
    result.assert_exactly_once(ids)
    assert result.completed() == n
    assert stats["by_status"].get("529", 0) > 0, "the fake should have answered some 529s"
    assert stats["succeeded"] == n
    assert sorted(stats["calls_by_request"].values()) == [1] * n
    retried = [t for t in ids if int(rclient.hget(keys.result(t), "attempts") or 0) > 1]
    assert retried, "some tasks should have needed a second attempt"
    # One record per task, with its answer; each expires with the task's result.
    assert {k.decode() for k in rclient.keys(keys.task("*"))} == {keys.task(t) for t in ids}
    for t in ids:
        assert rclient.hget(keys.task(t), "answer") is not None, t
        assert 0 < rclient.ttl(keys.task(t)) <= rclient.ttl(keys.result(t)) + 1, t
