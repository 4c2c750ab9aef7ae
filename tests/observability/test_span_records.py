"""Span records: encoded as the SDK's exporters would encode them, sampled as its samplers
would sample, and the current span of the handler that runs under them."""

from __future__ import annotations

import random

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision

from observability import tracing as tracing_module
from observability.otlp_encode import Encoder
from observability.span_export import SdkExport
from observability.spans import CLIENT, CONSUMER, ERROR, SpanData, SpanShape
from observability.tracing import StageSpan, Tracing, _env_sampler
from pipeline import App, Complete, Keys, Message, Outcome, Stage
from pipeline.runtime.outcome import Retry
from pipeline.runtime.wire import Envelope

SHAPE = SpanShape(
    "process p:tasks", CONSUMER,
    {"messaging.system": "redis", "messaging.destination.name": "p:tasks"},
    ("messaging.message.id", "messaging.message.conversation_id"),
)  # fmt: skip


def spans() -> list[SpanData]:
    """Plain spans, roots with a tracestate, values at and past what one length byte holds
    (the encoder's two ways), and a span with every rare part."""
    plain = SpanData(SHAPE, "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7",
                     "a3ce929d0e0e4736", 1_700_000_000_000_000_000, ("1-0", "task-1"))  # fmt: skip
    plain.end_ns = plain.start_ns + 1_500
    root = SpanData(SHAPE, "0af7651916cd43dd8448eb211c80319c", "0000000000000007", None, 5,
                    ("2-0", "task-2"), trace_state="vendor=abc,x=1")  # fmt: skip
    long_root = SpanData(SHAPE, "0af7651916cd43dd8448eb211c80319c", "0000000000000008", None,
                         5, ("3-0", "é" * 200), trace_state="vendor=abc")  # fmt: skip
    # "messaging.message.conversation_id" makes a 39-byte KeyValue with an empty value.
    edge = [
        SpanData(SHAPE, "4bf92f3577b34da6a3ce929d0e0e4736", f"{n:016x}", "a3ce929d0e0e4736",
                 10, ("4-0", "t" * n), remote_parent=False)
        for n in (87, 88, 89, 126, 127)
    ]  # fmt: skip
    rich = SpanData(SpanShape("chat claude-haiku-4-5", CLIENT, {"gen_ai.operation.name": "chat"}),
                    "4bf92f3577b34da6a3ce929d0e0e4736", "000000000000000b", "00f067aa0ba902b7", 100,
                    remote_parent=False)  # fmt: skip
    rich.end_ns = 200
    rich.attributes = {"gen_ai.usage.input_tokens": 12, "ok": True, "ratio": 0.5,
                       "tags": ("a", "b")}  # fmt: skip
    rich.events = [("retry", 150, {"pipeline.reason": "529 overloaded", "pipeline.delay_ms": 80})]
    rich.status = (ERROR, "gave up")
    return [plain, root, long_root, *edge, rich]


def test_the_encoding_is_what_the_sdks_exporter_sends_for_the_same_spans() -> None:
    resource = Resource({"service.name": "svc", "host.cores": 2})
    ours = ExportTraceServiceRequest.FromString(
        Encoder(resource.attributes, "claude-pipeline", "1.2").encode(spans())
    )
    provider = TracerProvider(resource=resource)
    readable = [SdkExport(provider, "claude-pipeline", "1.2").readable(s) for s in spans()]
    sdks = encode_spans(readable)
    # The SDK leaves the W3C flags out of Span.flags (the proto's low byte); we set "sampled".
    for span in ours.resource_spans[0].scope_spans[0].spans:
        assert span.flags & 0xFF == 0x01
        span.flags &= ~0xFF
    # The SDK always sends a status, an empty one when unset; we leave an unset one out.
    for span in sdks.resource_spans[0].scope_spans[0].spans:
        if span.status == Status():
            span.ClearField("status")
    assert ours == sdks


def test_the_root_decision_of_the_env_samplers_is_the_sdks() -> None:
    rng = random.Random(7)
    ids = [rng.getrandbits(128) for _ in range(4000)]
    for env in (
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
        {"OTEL_TRACES_SAMPLER": "always_off"},
        {},
    ):
        sampler, sample_root = _env_sampler(env)
        assert sampler is not None and sample_root is not None
        expected = [
            sampler.should_sample(None, i, "x").decision is Decision.RECORD_AND_SAMPLE for i in ids
        ]
        assert [sample_root(i) for i in ids] == expected, env
    assert _env_sampler({"OTEL_TRACES_SAMPLER": "my_entry_point"}) == (None, None)


def _message(traceparent: str | None, attempt: int = 1, deliveries: int = 1) -> Message:
    env = Envelope(v=1, task_id="task-9", fields={}, attempt=attempt, origin_ms=0,
                   enqueued_ms=0, traceparent=traceparent)  # fmt: skip
    return Message(env, "5-0", "first", None, deliveries)


async def _done(msg: Message) -> Outcome:
    return Complete()


def test_the_handler_runs_under_the_stage_span_and_its_own_spans_join_the_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider, App([Stage("first", "tasks", _done)]), Keys("p"))
    span = tracing.start(_message("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"))
    assert isinstance(span, StageSpan)

    def handler_code() -> None:
        current = trace.get_current_span()
        assert current is span
        current.set_attribute("app.note", "from the handler")
        with provider.get_tracer("app").start_as_current_span("app work"):
            pass
        current.end()  # a handler ending the stage span: ignored, the runtime ends it

    assert tracing_module._CURRENT_CONTEXT is not None  # the fast path, on these versions
    span.task_context().run(handler_code)
    # Without a contextvars runtime context, the API's attach does the same.
    monkeypatch.setattr(tracing_module, "_CURRENT_CONTEXT", None)
    assert span.task_context().run(trace.get_current_span) is span
    assert span.is_recording()
    assert trace.get_current_span() is trace.INVALID_SPAN  # only the task's context changed
    span.handoff("retry", "529 overloaded", 250)
    span.finish(Retry("529 overloaded"))
    inner, stage = exporter.get_finished_spans()
    assert inner.name == "app work" and stage.name == "process p:tasks"
    assert inner.parent is not None and inner.parent.span_id == int(span.span_id, 16)
    assert inner.context is not None and inner.context.trace_id == span.get_span_context().trace_id
    assert stage.attributes is not None
    assert stage.attributes["app.note"] == "from the handler"
    assert stage.attributes["pipeline.retry.delay_ms"] == 250
    assert stage.attributes["pipeline.outcome"] == "retry"
    assert [e.name for e in stage.events] == ["retry"]
    tracing.shutdown()


def test_an_unsampled_entry_costs_no_span_and_carries_its_context_on() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider, App([Stage("first", "tasks", _done)]), Keys("p"),
                      sample_root=lambda trace_id: False)  # fmt: skip
    assert (
        tracing.start(_message("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")) is None
    )
    root = tracing.start(_message(None))
    assert root is not None and root.task_context() is None
    traceparent, _ = root.handoff("forward", "second", None)
    assert traceparent.endswith("-00") and len(traceparent) == 55
    assert root.handoff("retry", "x", 5)[0] == traceparent  # one decision per entry
    root.finish(Complete())
    tracing.shutdown()
    assert exporter.get_finished_spans() == ()
