"""One OpenTelemetry trace per task, across every stage (DESIGN: Observability).

The runtime knows nothing of OpenTelemetry. A worker whose `OTEL_*` variables ask for traces
calls `start_tracing`, which adds `TracingHook` to its hooks and watches the Claude calls
(`pipeline.claude.observe_calls`):

- each stage's handling of an entry is a `process <stream>` CONSUMER span (messaging
  conventions), a child of the span that sent the entry (the producer's, or the stage
  before), so the producer's trace goes on; with no traceparent the first stage starts one;
- the span's context goes into the entry the stage hands on (`Hook.on_handoff`), so the
  next stage, a retry, the DLQ entry and the result's `trace_id` all carry the same trace;
- each Messages call is a `chat <model>` CLIENT span (GenAI conventions) under the stage span;
- retries, deferrals, pauses, dead letters and redeliveries are span events; cache hits an
  attribute.

Unsampled entries cost a sampler decision and a span context: attributes are built only for
spans that record. The anthropic SDK (2.x) would also emit an `anthropic.messages.create`
span per call under the global provider; `start_tracing` turns that off (unless
`ANTHROPIC_OPEN_TELEMETRY` is set) so each call appears once, as the `chat` span.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from observability.propagation import SCOPE, format_context, parent_context
from pipeline.claude import CallReport, observe_calls
from pipeline.errors import ConfigError
from pipeline.hooks import Hook, TraceContext
from pipeline.keys import Keys
from pipeline.outcome import Complete, Fail, Forward, Outcome, Retry
from pipeline.stage import App, Message
from pipeline.task import Answer, Request

__all__ = ["Tracing", "TracingHook", "start_tracing"]

log = logging.getLogger(__name__)
#: Reasons are error messages (never prompts); long ones are cut on spans.
_MAX_REASON_CHARS = 300
_SERVICE_NAME = "claude-pipeline"
_OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


@dataclass(slots=True)
class _Active:
    """The stage span of the entry the current handler task is working on."""

    msg: Message
    span: Span
    token: object


_active: ContextVar[_Active | None] = ContextVar("pipeline_stage_span", default=None)


class TracingHook(Hook):
    """The stage spans (one per handled entry) and the Claude call spans under them."""

    def __init__(self, tracer: trace.Tracer, app: App, keys: Keys) -> None:
        self._tracer = tracer
        self._app = app
        self._keys = keys
        self._streams: dict[tuple[str, str | None], str] = {}

    # ---- the stage span -------------------------------------------------------------------

    async def before_handle(self, msg: Message) -> None:
        span = self._start(msg)
        token = otel_context.attach(trace.set_span_in_context(span))
        _active.set(_Active(msg, span, token))

    async def after_handle(self, msg: Message, outcome: Outcome | BaseException) -> None:
        active = _active.get()
        if active is None or active.msg is not msg:
            return
        _active.set(None)
        span = active.span
        if span.is_recording():
            _record_outcome(span, outcome)
        span.end()
        otel_context.detach(active.token)  # type: ignore[arg-type]

    def on_handoff(
        self, msg: Message, action: str, detail: str, delay_ms: int | None
    ) -> TraceContext | None:
        active = _active.get()
        own = active is None or active.msg is not msg
        # Dead-lettered before any handler ran (delivered too often): a span of its own.
        span = self._start(msg) if own else active.span  # type: ignore[union-attr]
        if span.is_recording() and action != "forward":
            event: dict[str, AttributeValue] = {"pipeline.reason": detail[:_MAX_REASON_CHARS]}
            if delay_ms is not None:
                event["pipeline.delay_ms"] = delay_ms
                span.set_attribute(f"pipeline.{action}.delay_ms", delay_ms)
            span.add_event(action, event)
            if action == "dead_letter":
                span.set_status(Status(StatusCode.ERROR, detail[:_MAX_REASON_CHARS]))
        carried = format_context(span.get_span_context())
        if own:
            span.end()
        return carried

    def _start(self, msg: Message) -> Span:
        env = msg.envelope
        stream = self._stream(msg)
        span = self._tracer.start_span(
            f"process {stream}",
            context=parent_context(env.traceparent, env.tracestate),
            kind=SpanKind.CONSUMER,
        )
        if span.is_recording():
            span.set_attributes(
                {
                    "messaging.system": "redis",
                    "messaging.operation.type": "process",
                    "messaging.operation.name": "process",
                    "messaging.destination.name": stream,
                    "messaging.consumer.group.name": msg.stage,
                    "messaging.message.id": msg.entry_id,
                    "messaging.message.conversation_id": msg.task_id,
                    "pipeline.attempt": msg.attempt,
                    "pipeline.deliveries": msg.deliveries,
                }
            )
            if msg.deliveries > 1:  # reclaimed from a dead worker, or resumed after a restart
                span.add_event("redelivered", {"pipeline.deliveries": msg.deliveries})
        return span

    def _stream(self, msg: Message) -> str:
        key = (msg.stage, msg.lane)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._keys.stream(self._app.stage(msg.stage).stream, msg.lane)
            self._streams[key] = stream
        return stream

    # ---- the Claude call --------------------------------------------------------------------

    def on_call(self, report: CallReport) -> None:
        """A `chat <model>` CLIENT span, under the current stage span, with the call's times."""
        span = self._tracer.start_span(
            f"chat {report.request_model}", kind=SpanKind.CLIENT, start_time=report.started_ns
        )
        if span.is_recording():
            span.set_attributes(_call_attributes(report))
            if report.error_type is not None:
                span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=report.ended_ns)


def _call_attributes(report: CallReport) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": report.request_model,
        "gen_ai.request.max_tokens": report.max_tokens,
        "pipeline.model_family": report.family,
    }
    if report.status:
        attributes["http.response.status_code"] = report.status
    if report.response_model:
        attributes["gen_ai.response.model"] = report.response_model
    if (usage := report.usage) is not None:
        # The GenAI conventions count every input token, cached or not, in input_tokens.
        attributes["gen_ai.usage.input_tokens"] = (
            usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
        )
        attributes["gen_ai.usage.output_tokens"] = usage.output_tokens
        attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cache_read_input_tokens
        attributes["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_creation_input_tokens
    if report.error_type is not None:
        # Low cardinality: the HTTP status when there is one, else the error class.
        attributes["error.type"] = str(report.status) if report.status else report.error_type
    return attributes


def _record_outcome(span: Span, outcome: Outcome | BaseException) -> None:
    if isinstance(outcome, BaseException):
        kind = type(outcome).__name__
        span.set_attribute("pipeline.outcome", "interrupted")
        if isinstance(outcome, Exception):  # an AuthError pause
            span.set_attribute("error.type", kind)
            span.set_status(Status(StatusCode.ERROR, kind))
        else:  # cancelled at shutdown: the entry is handed back to another worker
            span.add_event("handed_back")
        return
    if isinstance(outcome, Forward):
        span.set_attribute("pipeline.outcome", "forward")
        span.set_attribute("pipeline.forward.to", outcome.to)
        body = outcome.body
        if isinstance(body, Answer):
            if body.coalesced:
                span.set_attribute("pipeline.coalesced", True)
            elif body.cached:
                span.set_attribute("pipeline.cache.hit", True)
        elif isinstance(body, Request):
            span.set_attribute("pipeline.cache.hit", False)
    elif isinstance(outcome, Complete):
        span.set_attribute("pipeline.outcome", "complete")
    elif isinstance(outcome, Retry):
        span.set_attribute("pipeline.outcome", "retry")
    elif isinstance(outcome, Fail):
        span.set_attribute("pipeline.outcome", "fail")
    else:
        span.set_attribute("pipeline.outcome", type(outcome).__name__.lower())


class Tracing:
    """Tracing in one worker process: the hook to install, and shutdown (which flushes)."""

    def __init__(self, provider: trace.TracerProvider, app: App, keys: Keys, *, owned: bool):
        self.provider = provider
        self.hook = TracingHook(provider.get_tracer(SCOPE, _version()), app, keys)
        self._owned = owned
        self._unobserve = observe_calls(self.hook.on_call)
        # Each call once, as the `chat` span: Anthropic clients made from now on (the worker
        # builds its stages after this) leave out the SDK's own span, unless asked for.
        os.environ.setdefault("ANTHROPIC_OPEN_TELEMETRY", "false")

    def shutdown(self) -> None:
        """Stop watching calls; flush and close the provider if this process made it."""
        self._unobserve()
        if self._owned and isinstance(self.provider, TracerProvider):
            self.provider.shutdown()


def start_tracing(app: App, keys: Keys, environ: Mapping[str, str] = os.environ) -> Tracing:
    """Tracing as the `OTEL_*` variables configure it, the provider made global.

    The SDK reads its own variables: the sampler (`OTEL_TRACES_SAMPLER`, `_ARG`), the
    resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`), the batch processor
    (`OTEL_BSP_*`) and each exporter's endpoint, headers and timeout. Only the choice of
    exporter (`OTEL_TRACES_EXPORTER`, default `otlp`; `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`,
    default `grpc` as in the Python SDK) is made here. A provider the application already set
    (e.g. under `opentelemetry-instrument`) is used as it is.
    """
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return Tracing(current, app, keys, owned=False)
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": _SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    for exporter in _exporters(environ):
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # handlers' own spans join the task's trace
    return Tracing(provider, app, keys, owned=True)


def _exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for raw in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(","):
        name = raw.strip().lower()
        if name in ("", "none"):
            continue
        if name == "otlp":
            protocol = (
                environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc"
            ).strip()
            if protocol not in _OTLP_BY_PROTOCOL:
                raise ConfigError(
                    "OTEL_EXPORTER_OTLP_PROTOCOL",
                    f"{protocol!r} is not one of {', '.join(_OTLP_BY_PROTOCOL)}",
                )
            name = _OTLP_BY_PROTOCOL[protocol]
        found = importlib.metadata.entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found:
            raise ConfigError(
                "OTEL_TRACES_EXPORTER",
                f"no trace exporter {name!r} is installed (pip install 'claude-pipeline[otlp]')",
            )
        exporters.append(next(iter(found)).load()())
    return exporters


def _version() -> str:
    try:
        return importlib.metadata.version("claude-pipeline")
    except importlib.metadata.PackageNotFoundError:
        return "0"
