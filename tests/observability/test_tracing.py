"""One trace per task, read back from an in-memory exporter.

The four real stages run in this process (`run_worker`, as a worker runs them) against a real
Redis and the fake Claude API, with `Tracing` as the runtime's tracer; the client's PRODUCER spans
and the stages' spans go to one in-memory exporter. OpenTelemetry's global tracer provider can
be set once per process, so every test here shares it and keeps to its own traces.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import msgspec
import pytest
import redis
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode

from observability.tracing import Tracing
from pipeline import (
    App,
    Complete,
    Forward,
    Hook,
    Keys,
    Message,
    Outcome,
    Settings,
    Stage,
    load_settings,
)
from pipeline.cli.worker import run_worker
from pipeline.client import Client
from pipeline.runtime.traceparent import TraceContext
from pipeline.runtime.wire import Envelope
from stages import app as stages_app
from tests.conftest import StartFake
from tests.helpers.workers import wait_until

pytestmark = pytest.mark.anyio
STAGES = ("cache-check", "router", "claude-call", "store")


@pytest.fixture(scope="module")
def _global_tracing() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A global provider for this module's tests, forgotten afterwards: later tests in the
    session (the client's exact wire fields) must see a process without tracing."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()
    # What OpenTelemetry's own test utilities do (reset_trace_globals): the API allows
    # setting the global provider once per process.
    trace._TRACER_PROVIDER_SET_ONCE = trace.Once()  # type: ignore[attr-defined]
    trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]


@pytest.fixture
def exporter(
    _global_tracing: tuple[TracerProvider, InMemorySpanExporter],
) -> Iterator[InMemorySpanExporter]:
    _global_tracing[1].clear()
    yield _global_tracing[1]
    _global_tracing[1].clear()


@pytest.fixture
def provider(_global_tracing: tuple[TracerProvider, InMemorySpanExporter]) -> TracerProvider:
    return _global_tracing[0]


def settings_for(fast_env: dict[str, str], base_url: str, **env: str) -> Settings:
    return load_settings(env={**fast_env, "PIPELINE_CLAUDE__BASE_URL": base_url, **env})


@contextlib.asynccontextmanager
async def pipeline_running(
    settings: Settings,
    provider: TracerProvider,
    monkeypatch: pytest.MonkeyPatch,
    *,
    given: bool = True,
    stages: Sequence[str] = STAGES,
) -> AsyncIterator[None]:
    """All four stages (or `stages`) in this process, traced, until the block ends. `given`:
    the tracing hook is handed to the worker; else the worker finds the global provider
    itself."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "good-key")
    monkeypatch.delenv("ANTHROPIC_OPEN_TELEMETRY", raising=False)  # the SDK span: off
    app = stages_app(settings)
    tracing = Tracing(provider, app, Keys(settings.prefix))
    ready = asyncio.Event()
    worker = asyncio.create_task(
        run_worker(app, list(stages), settings, hooks=[tracing] if given else [], ready=ready,
                   concurrency=16)
    )  # fmt: skip
    try:
        await asyncio.wait({worker, asyncio.create_task(ready.wait())}, timeout=30,
                           return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        assert ready.is_set(), worker.exception() if worker.done() else "worker never started"
        yield
    finally:
        # Stopped as operators stop it (the worker's own SIGTERM handler), not cancelled.
        if not worker.done():
            os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(worker, 30)
        tracing.shutdown()


def trace_of(exporter: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    return [
        s
        for s in exporter.get_finished_spans()
        if s.context and f"{s.context.trace_id:032x}" == trace_id
    ]


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


async def wait_for_spans(
    exporter: InMemorySpanExporter, trace_id: str, count: int
) -> list[ReadableSpan]:
    """The spans of one trace once `count` of them have ended (the last stage's ends after
    its result is written). Polled on a thread: the worker runs on this event loop."""
    await asyncio.to_thread(wait_until, lambda: len(trace_of(exporter, trace_id)) >= count,
                            10, what=f"{count} spans")  # fmt: skip
    return trace_of(exporter, trace_id)


async def test_one_task_is_one_trace_across_producer_stages_and_the_claude_call(
    start_fake: StartFake,
    fast_env: dict[str, str],
    prefix: str,
    redis_url: str,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = start_fake(max_output_tokens=100)  # under max_tokens: complete, so cached
    settings = settings_for(fast_env, fake.base_url)
    keys = Keys(prefix)
    async with pipeline_running(settings, provider, monkeypatch), Client(
        redis_url, prefix, settings=settings
    ) as client:  # fmt: skip
        task_id = await client.submit("Say hello", type="classify", max_tokens=500)
        result = await client.result(task_id, wait=30)
        assert result is not None and result["status"] == "completed", result
        trace_id = result["trace_id"]
        spans = await wait_for_spans(exporter, trace_id, 6)

        send = one(spans, f"send {keys.ingress}")
        assert send.kind == SpanKind.PRODUCER and send.parent is None
        assert send.attributes is not None
        assert send.attributes["messaging.system"] == "redis"
        assert send.attributes["messaging.operation.type"] == "send"
        assert send.attributes["messaging.destination.name"] == keys.ingress
        assert send.attributes["messaging.message.conversation_id"] == task_id

        streams = [keys.ingress, keys.stream("route"), keys.stream("call", "haiku"),
                   keys.stream("store")]  # fmt: skip
        parent = send
        for stage, stream in zip(STAGES, streams, strict=True):
            span = one(spans, f"process {stream}")
            assert span.kind == SpanKind.CONSUMER
            assert parent_of(span) == parent.context.span_id, stage  # type: ignore[union-attr]
            assert span.attributes is not None
            assert dict(span.attributes) | {"messaging.message.id": "?"} == {
                "messaging.system": "redis",
                "messaging.operation.type": "process",
                "messaging.destination.name": stream,
                "messaging.consumer.group.name": stage,
                "messaging.message.id": "?",
                "messaging.message.conversation_id": task_id,
                **({"pipeline.cache.hit": False} if stage == "cache-check" else {}),
            }  # fmt: skip
            assert str(span.attributes["messaging.message.id"]).count("-") == 1
            parent = span

        call_span = one(spans, f"process {keys.stream('call', 'haiku')}")
        chat = next(s for s in spans if s.kind == SpanKind.CLIENT)
        assert chat.name.startswith("chat claude-haiku")
        assert parent_of(chat) == call_span.context.span_id  # type: ignore[union-attr]
        assert call_span.start_time <= chat.start_time <= chat.end_time <= call_span.end_time  # type: ignore[operator]
        attrs = dict(chat.attributes or {})
        input_all = sum(int(result[k]) for k in ("input_tokens", "cache_read_input_tokens",
                                                 "cache_creation_input_tokens"))  # fmt: skip
        assert attrs["gen_ai.operation.name"] == "chat"
        assert attrs["gen_ai.provider.name"] == "anthropic"
        assert attrs["gen_ai.request.model"] == chat.name.removeprefix("chat ")
        assert attrs["gen_ai.response.model"] == result["model"]
        assert attrs["gen_ai.request.max_tokens"] == 500
        assert attrs["gen_ai.usage.input_tokens"] == input_all > 0
        assert attrs["gen_ai.usage.output_tokens"] == int(result["output_tokens"]) > 0
        assert attrs["http.response.status_code"] == 200
        assert "error.type" not in attrs
        # The SDK's own call span is turned off: each call appears once.
        assert not [s for s in exporter.get_finished_spans() if s.name.startswith("anthropic.")]
        assert len(spans) == 6, [s.name for s in spans]

        # The same request again: answered from the cache, which the cache-check span says.
        again = await client.submit("Say hello", type="classify", max_tokens=500)
        cached = await client.result(again, wait=30)
        assert cached is not None and cached["cached"] == "true", cached
        spans = await wait_for_spans(exporter, cached["trace_id"], 3)
        check = one(spans, f"process {keys.ingress}")
        assert check.attributes and check.attributes["pipeline.cache.hit"] is True
        assert sorted(s.name for s in spans) == sorted(
            [f"send {keys.ingress}", f"process {keys.ingress}", f"process {keys.stream('store')}"]
        )


async def test_a_batched_task_shows_its_wait_and_its_batch_id(
    start_fake: StartFake,
    fast_env: dict[str, str],
    prefix: str,
    redis_url: str,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = start_fake(max_output_tokens=100, batch_processing_s=0.3)
    settings = settings_for(fast_env, fake.base_url, PIPELINE_BATCH__MAX_WAIT_S="0.3",
                            PIPELINE_BATCH__POLL_S="0.2")  # fmt: skip
    keys = Keys(prefix)
    stages = ("cache-check", "router", "claude-batch", "store")
    async with pipeline_running(settings, provider, monkeypatch, stages=stages), Client(
        redis_url, prefix, settings=settings
    ) as client:  # fmt: skip
        task_id = await client.submit("Sum up the night", type="classify", max_tokens=500,
                                      batch=True)  # fmt: skip
        result = await client.result(task_id, wait=30)
        assert result is not None and result["status"] == "completed", result
        spans = await wait_for_spans(exporter, result["trace_id"], 6)

    batch_stream = keys.stream("batch", "haiku")
    router = one(spans, f"process {keys.stream('route')}")
    shelving = one(spans, f"process {batch_stream}")
    wait = one(spans, f"wait {batch_stream}")
    store = one(spans, f"process {keys.stream('store')}")
    assert len(spans) == 6, [s.name for s in spans]
    # The wait sits beside the stage that shelved the task, from shelving to answer.
    assert parent_of(wait) == parent_of(shelving) == router.context.span_id  # type: ignore[union-attr]
    # The shelf keeps its time in milliseconds: the wait starts within the shelving span's ms.
    ms = 1_000_000
    assert shelving.start_time - ms <= wait.start_time <= shelving.end_time  # type: ignore[operator]
    assert wait.end_time <= store.start_time  # type: ignore[operator]
    assert wait.end_time - wait.start_time >= 0.2e9  # type: ignore[operator]
    attrs = dict(wait.attributes or {})
    (custom_id,) = fake.batch_stats()["requests_by_custom_id"]
    assert attrs["pipeline.batch.token"] == custom_id.rsplit("-", 1)[0]
    assert str(attrs["pipeline.batch.id"]).startswith("msgbatch_")
    assert attrs["pipeline.held.outcome"] == "answered"
    assert attrs["pipeline.batch.result"] == "succeeded"
    assert attrs["messaging.message.conversation_id"] == task_id


async def test_a_retried_call_shows_the_retry_and_both_attempts(
    start_fake: StartFake,
    fast_env: dict[str, str],
    prefix: str,
    rclient: redis.Redis,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With this seed the fake's first call is a 529 and its second succeeds.
    fake = start_fake(overloaded_rate=0.5, seed=2)
    settings = settings_for(fast_env, fake.base_url)
    keys = Keys(prefix)
    async with pipeline_running(settings, provider, monkeypatch):
        # No traceparent from this producer: the first stage starts the trace.
        task_id = rclient.xadd(keys.ingress, {"prompt": "retry me", "type": "classify"}).decode()
        result = await wait_result(rclient, keys, task_id)
        assert result["status"] == "completed" and result["attempts"] == "2", result
        spans = await wait_for_spans(exporter, result["trace_id"], 7)

    calls = sorted((s for s in spans if s.name == f"process {keys.stream('call', 'haiku')}"),
                   key=lambda s: s.start_time or 0)  # fmt: skip
    assert [(c.attributes or {}).get("pipeline.attempt", 1) for c in calls] == [1, 2]
    first, second = calls
    assert parent_of(second) == first.context.span_id  # type: ignore[union-attr]
    assert first.attributes and first.attributes["pipeline.outcome"] == "retry"
    delay = first.attributes["pipeline.retry.delay_ms"]
    assert isinstance(delay, int) and delay > 0
    (retry,) = [e for e in first.events if e.name == "retry"]
    assert retry.attributes and retry.attributes["pipeline.delay_ms"] == delay
    assert "529" in str(retry.attributes["pipeline.reason"])
    chats = sorted((s for s in spans if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time or 0)
    assert [parent_of(c) for c in chats] == [c.context.span_id for c in calls]  # type: ignore[union-attr]
    failed = dict(chats[0].attributes or {})
    assert failed["error.type"] == "529" and failed["http.response.status_code"] == 529
    assert chats[0].status.status_code == StatusCode.ERROR
    assert "gen_ai.usage.input_tokens" not in failed
    assert chats[1].status.status_code != StatusCode.ERROR
    roots = [s for s in spans if s.parent is None]
    assert [r.name for r in roots] == [f"process {keys.ingress}"]


async def test_a_dead_lettered_task_keeps_its_trace_in_the_failed_result(
    start_fake: StartFake,
    fast_env: dict[str, str],
    prefix: str,
    rclient: redis.Redis,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = start_fake(overloaded_rate=1.0)
    settings = settings_for(fast_env, fake.base_url, PIPELINE_RETRY__MAX_ATTEMPTS="2")
    keys = Keys(prefix)
    async with pipeline_running(settings, provider, monkeypatch):
        task_id = rclient.xadd(keys.ingress, {"prompt": "never", "type": "classify"}).decode()
        result = await wait_result(rclient, keys, task_id)
        assert result["status"] == "failed", result
        spans = await wait_for_spans(exporter, result["trace_id"], 6)
    last = max((s for s in spans if s.name == f"process {keys.stream('call', 'haiku')}"),
               key=lambda s: s.start_time or 0)  # fmt: skip
    assert [e.name for e in last.events] == ["dead_letter"]
    assert last.status.status_code == StatusCode.ERROR
    (entry,) = rclient.xrange(keys.dlq)[-1:]
    assert entry[1][b"traceparent"].decode().split("-")[1] == result["trace_id"]


async def test_a_traceparent_xadded_by_redis_cli_is_continued(
    start_fake: StartFake,
    fast_env: dict[str, str],
    prefix: str,
    rclient: redis.Redis,
    redis_url: str,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if shutil.which("redis-cli") is None:
        pytest.skip("needs redis-cli")
    fake = start_fake()
    settings = settings_for(fast_env, fake.base_url)
    keys = Keys(prefix)
    port = str(redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"])
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    unsampled = "0af7651916cd43dd8448eb211c80319c"

    def redis_cli(*args: str) -> str:
        out = subprocess.run(["redis-cli", "-p", port, "XADD", keys.ingress, "*", *args],
                             check=True, capture_output=True, text=True)  # fmt: skip
        return out.stdout.strip()

    async with pipeline_running(settings, provider, monkeypatch):
        sampled_id = redis_cli("prompt", "from another language", "type", "classify",
                               "traceparent", f"00-{trace_id}-{span_id}-01",
                               "tracestate", "vendor=abc")  # fmt: skip
        skipped_id = redis_cli("prompt", "not sampled", "type", "classify",
                               "traceparent", f"00-{unsampled}-{span_id}-00")  # fmt: skip
        result = await wait_result(rclient, keys, sampled_id)
        skipped = await wait_result(rclient, keys, skipped_id)
        spans = await wait_for_spans(exporter, trace_id, 5)
    assert result["trace_id"] == trace_id
    check = one(spans, f"process {keys.ingress}")
    assert parent_of(check) == int(span_id, 16)
    assert check.parent is not None and check.parent.is_remote
    assert all(s.context and s.context.trace_state.get("vendor") == "abc" for s in spans)
    # The producer decided not to sample: nothing recorded, but the trace id still goes through.
    assert skipped["trace_id"] == unsampled
    assert trace_of(exporter, unsampled) == []


async def test_an_entry_reclaimed_from_a_dead_consumer_records_the_redelivery(
    start_fake: StartFake,
    fast_env: dict[str, str],
    prefix: str,
    rclient: redis.Redis,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = start_fake()
    settings = settings_for(fast_env, fake.base_url)
    keys = Keys(prefix)
    # A consumer that reads the entry and dies holding it: its lease lapses, a worker reclaims.
    rclient.xgroup_create(keys.ingress, "cache-check", id="0", mkstream=True)
    task_id = rclient.xadd(keys.ingress, {"prompt": "orphan", "type": "classify"}).decode()
    rclient.xreadgroup("cache-check", "ghost", {keys.ingress: ">"}, count=1)
    async with pipeline_running(settings, provider, monkeypatch):
        result = await wait_result(rclient, keys, task_id)
        spans = await wait_for_spans(exporter, result["trace_id"], 5)
    check = one(spans, f"process {keys.ingress}")
    assert check.attributes and check.attributes["pipeline.deliveries"] == 2
    assert [e.name for e in check.events] == ["redelivered"]


async def wait_result(rclient: redis.Redis, keys: Keys, task_id: str) -> dict[str, Any]:
    key = keys.result(task_id)
    await asyncio.to_thread(wait_until, lambda: rclient.exists(key) == 1, 30, what="the result")
    return {k.decode(): v.decode() for k, v in rclient.hgetall(key).items()}


async def test_a_tracer_provider_the_application_set_gets_every_span_without_otel_variables(
    start_fake: StartFake,
    fast_env: dict[str, str],
    prefix: str,
    redis_url: str,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No `OTEL_*` at all, no hook handed in: the worker sees the global provider the
    application set and traces on it (the producer's span plus four stages and the call)."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    assert trace.get_tracer_provider() is provider
    fake = start_fake()
    settings = settings_for(fast_env, fake.base_url)
    async with pipeline_running(settings, provider, monkeypatch, given=False), Client(
        redis_url, prefix, settings=settings
    ) as client:  # fmt: skip
        task_id = await client.submit("Say hello", type="classify")
        result = await client.result(task_id, wait=30)
        assert result is not None and result["status"] == "completed", result
        spans = await wait_for_spans(exporter, result["trace_id"], 6)
    kinds = sorted(s.kind.name for s in spans)
    assert kinds == ["CLIENT", "CONSUMER", "CONSUMER", "CONSUMER", "CONSUMER", "PRODUCER"]
    assert len({s.context.trace_id for s in spans if s.context}) == 1


def test_envelope_trace_fields_are_plain_w3c() -> None:
    """What a stage writes is what another language's consumer would parse."""
    from observability.propagation import format_context, parent_context

    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    ctx = trace.get_current_span(parent_context(tp, "a=1,b=2")).get_span_context()
    assert format_context(ctx) == (tp, "a=1,b=2")
    assert parent_context("garbage", None) == parent_context(None, None)
    assert msgspec.json.encode(format_context(ctx)) == f'["{tp}","a=1,b=2"]'.encode()


async def test_a_trace_is_sampled_once_at_its_root_and_followed_by_every_stage() -> None:
    """The sampler is asked once per new trace; unsampled entries make no span anywhere."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.5)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def handler(msg: Message) -> Outcome:
        return Complete()

    app = App([Stage("first", "tasks", handler), Stage("second", "next", handler)])
    tracing = Tracing(provider, app, Keys("sampling"), owned=True)  # asks the SDK's sampler

    async def handle(stage: str, n: int, traceparent: str | None) -> TraceContext | None:
        env = Envelope(v=1, task_id=f"t{n}", fields={}, attempt=1, origin_ms=0, enqueued_ms=0,
                       traceparent=traceparent)  # fmt: skip
        msg = Message(env, f"{n}-0", stage, None, 1)
        span = tracing.start_span(msg)
        if span is None:
            return None
        carried = span.handoff("forward", "second", None)
        span.finish(Forward("second"))
        return carried

    sampled, unsampled = set(), set()
    for n in range(400):
        carried = await asyncio.create_task(handle("first", n, None))
        assert carried is not None
        _, trace_id, _, flags = carried[0].split("-")
        (sampled if int(flags, 16) & 1 else unsampled).add(trace_id)
        onward = await asyncio.create_task(handle("second", n, carried[0]))
        assert onward is None if trace_id in unsampled else trace_id in onward[0]
    tracing.shutdown()
    spans = exporter.get_finished_spans()
    assert 120 < len(sampled) < 280 and len(sampled) + len(unsampled) == 400
    by_trace: dict[str, list[str]] = {}
    for span in spans:
        by_trace.setdefault(f"{span.context.trace_id:032x}", []).append(span.name)  # type: ignore[union-attr]
    assert set(by_trace) == sampled
    assert all(sorted(names) == ["process sampling:next", "process sampling:tasks"]
               for names in by_trace.values())  # fmt: skip


def test_the_chat_span_names_cache_tokens_only_when_the_call_used_the_cache() -> None:
    """Every attribute is paid for on every span (made, encoded, sent, stored)."""
    from pipeline.claude.task import Usage
    from pipeline.runtime.calls import CallReport

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = App([Stage("call", "calls", lambda msg: Complete())])  # type: ignore[arg-type,return-value]
    tracing = Tracing(provider, app, Keys("chat"), owned=True)
    stage = provider.get_tracer("test").start_span("process")
    for cache_read in (0, 700):
        usage = Usage(input_tokens=10, output_tokens=5, cache_read_input_tokens=cache_read)
        report = CallReport("haiku", "claude-haiku-4-5", "claude-haiku-4-5", 64, 200, 1, 2,
                            usage, None)  # fmt: skip
        with trace.use_span(stage):
            tracing.on_call(report)
    tracing.shutdown()
    plain, cached = (dict(s.attributes or {}) for s in exporter.get_finished_spans())
    assert plain["gen_ai.usage.input_tokens"] == 10
    assert not [k for k in plain if ".cache_" in k]
    assert cached["gen_ai.usage.input_tokens"] == 710
    assert cached["gen_ai.usage.cache_read.input_tokens"] == 700
    assert "gen_ai.usage.cache_creation.input_tokens" not in cached


def test_the_resource_of_our_providers_equals_and_hashes_as_the_sdks_own() -> None:
    """Ours hashes once (the OTLP encoder hashes it per span); it must still group with,
    and compare equal to, the same resource built by anyone else."""
    from opentelemetry.sdk.resources import Resource

    from observability.otel import resource

    ours = resource("pipeline-router")
    theirs = Resource(ours.attributes, ours.schema_url)
    assert ours.attributes["service.name"] == "pipeline-router"
    assert ours == theirs and theirs == ours and hash(ours) == hash(theirs) == hash(ours)
    assert ours != Resource({**ours.attributes, "service.name": "other"})
    assert {ours: 1, theirs: 2} == {theirs: 2}


async def test_the_clients_send_span_continues_a_traceparent_the_caller_passed(
    redis_url: str, prefix: str, rclient: redis.Redis, exporter: InMemorySpanExporter
) -> None:
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with Client(redis_url, prefix) as client:
        task_id = await client.submit("hi", traceparent=f"00-{caller_trace}-{caller_span}-01",
                                      tracestate="vendor=abc")  # fmt: skip
    ((entry_id, fields),) = rclient.xrange(Keys(prefix).ingress)
    _, trace_id, span_id, _ = fields[b"traceparent"].decode().split("-")
    (send,) = trace_of(exporter, caller_trace)
    assert trace_id == caller_trace and span_id == f"{send.context.span_id:016x}"  # type: ignore[union-attr]
    assert parent_of(send) == int(caller_span, 16)
    assert fields[b"tracestate"] == b"vendor=abc"
    assert send.attributes and send.attributes["messaging.message.id"] == entry_id.decode()
    assert send.attributes["messaging.message.conversation_id"] == task_id == fields[b"id"].decode()


class _BrokenTracer(Hook):
    """A tracer with a bug in one of its three calls."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.calls = 0

    def start_span(self, msg: Message) -> _BrokenTracer:
        self.calls += 1
        if self.where == "start":
            raise RuntimeError("tracer bug in start")
        return self

    def task_context(self) -> None:
        return None

    def handoff(self, action: str, detail: str, delay_ms: int | None) -> TraceContext:
        if self.where == "handoff":
            raise RuntimeError("tracer bug in handoff")
        return "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None

    def finish(self, outcome: object) -> None:
        if self.where == "finish":
            raise RuntimeError("tracer bug in finish")


@pytest.mark.parametrize("where", ["start", "handoff", "finish"])
async def test_a_tracer_that_raises_never_fails_a_task(
    where: str, fast_env: dict[str, str], prefix: str, rclient: redis.Redis
) -> None:
    async def first(msg: Message) -> Outcome:
        return Forward("second", {"n": msg.fields["n"]})

    async def second(msg: Message) -> Outcome:
        return Complete({"status": "completed", "output": msg.body(dict)["n"]})

    app = App([Stage("first", "tasks", first), Stage("second", "second", second)])
    settings = load_settings(env=fast_env)
    keys = Keys(prefix)
    tracer = _BrokenTracer(where)
    ids = [rclient.xadd(keys.ingress, {"n": str(n)}).decode() for n in range(5)]
    ready = asyncio.Event()
    worker = asyncio.create_task(
        run_worker(app, ["first", "second"], settings, hooks=[tracer], ready=ready)
    )
    try:
        results = [await wait_result(rclient, keys, task_id) for task_id in ids]
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(worker, 30)
    assert [r["output"] for r in results] == [str(n) for n in range(5)]
    assert all(r["status"] == "completed" for r in results)
    assert tracer.calls == 10  # asked about every entry at both stages
    assert rclient.xlen(keys.dlq) == 0
