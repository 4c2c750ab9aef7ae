"""One OpenTelemetry trace per task, across every stage (DESIGN: Observability).

The runtime knows nothing of OpenTelemetry. A worker whose `OTEL_*` variables ask for traces
calls `start_tracing`, which adds `TracingHook` to its hooks and watches the Claude calls
(`pipeline.call_report.observe_calls`):

- each stage's handling of an entry is a `process <stream>` CONSUMER span (messaging
  conventions), a child of the span that sent the entry (the producer's, or the stage
  before), so the producer's trace goes on; with no traceparent the first stage starts one;
- the span's context goes into the entry the stage hands on (`Hook.on_handoff`), so the
  next stage, a retry, the DLQ entry and the result's `trace_id` all carry the same trace;
- each Messages call is a `chat <model>` CLIENT span (GenAI conventions) under the stage span;
- retries, deferrals, pauses, dead letters and redeliveries are span events; cache hits an
  attribute.

The hot path is kept short for what is not sampled: an entry not sampled upstream costs a
regex match, a new trace one sampler call and, unless sampled, a formatted traceparent; only
sampled spans get attributes. The anthropic SDK (2.x) would also emit an
`anthropic.messages.create` span per call under the global provider; `Tracing` turns that
off (unless `ANTHROPIC_OPEN_TELEMETRY` is set) so each call appears once, as the `chat` span.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision, Sampler
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from observability.propagation import SCOPE, format_context, parent_context
from pipeline.call_report import CallReport, observe_calls
from pipeline.errors import ConfigError
from pipeline.hooks import Hook, TraceContext
from pipeline.keys import Keys
from pipeline.outcome import Complete, Forward, Outcome
from pipeline.stage import App, Message
from pipeline.task import Answer, Request

__all__ = ["PresetIds", "Tracing", "TracingHook", "producer_tracing", "start_tracing"]

log = logging.getLogger(__name__)
#: Reasons are error messages (never prompts); long ones are cut on spans.
_MAX_REASON_CHARS = 300
_SERVICE_NAME = "claude-pipeline"
_FLUSH_TIMEOUT_S = 5.0
_OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


@dataclass(slots=True)
class _Active:
    """The entry the current handler task is working on, and its stage span (if sampled)."""

    msg: Message
    span: Span | None  # None: not sampled, so no span was made at all
    carried: TraceContext | None  # what an unsampled entry sends on (None: as it came)
    token: object = None


_active: ContextVar[_Active | None] = ContextVar("pipeline_stage_span", default=None)
#: A valid version-00 traceparent whose sampled flag is off.
_NOT_SAMPLED = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f][02468ace]")


class PresetIds(RandomIdGenerator):
    """Random ids, except that the next root span may take a trace id chosen in advance.

    The hook asks the sampler about a new trace before making a span: an unsampled root
    (99 in 100 at 1%) then costs a formatted traceparent, and a sampled one becomes a real
    span with the very trace id the sampler said yes to.
    """

    def __init__(self) -> None:
        self._next = 0

    def preset(self, trace_id: int) -> None:
        self._next = trace_id

    def generate_trace_id(self) -> int:
        trace_id, self._next = self._next, 0
        return trace_id or super().generate_trace_id()


class TracingHook(Hook):
    """The stage spans (one per handled entry) and the Claude call spans under them.

    The stages follow the sampled flag of the trace context an entry brings (as the default
    parent-based samplers do): an entry not sampled upstream costs a regex match here.
    """

    def __init__(
        self, tracer: trace.Tracer, app: App, keys: Keys, sampler: Sampler | None = None,
        ids: PresetIds | None = None,
    ) -> None:  # fmt: skip
        self._tracer = tracer
        self._app = app
        self._keys = keys
        self._streams: dict[tuple[str, str | None], str] = {}
        # Both or neither: asking the sampler first is only right if the span gets that id.
        self._roots = (sampler, ids) if sampler is not None and ids is not None else None

    # ---- the stage span -------------------------------------------------------------------

    async def before_handle(self, msg: Message) -> None:
        active = self._start(msg)
        if active.span is not None:
            active.token = otel_context.attach(trace.set_span_in_context(active.span))
        _active.set(active)

    async def after_handle(self, msg: Message, outcome: Outcome | BaseException) -> None:
        active = _active.get()
        if active is None or active.msg is not msg:
            return
        _active.set(None)
        span = active.span
        if span is None:
            return
        if span.is_recording():
            _record_outcome(span, outcome)
        span.end()
        otel_context.detach(active.token)  # type: ignore[arg-type]

    def on_handoff(
        self, msg: Message, action: str, detail: str, delay_ms: int | None
    ) -> TraceContext | None:
        active = _active.get()
        own = active is None or active.msg is not msg
        if own:  # dead-lettered before any handler ran (delivered too often)
            active = self._start(msg)
        assert active is not None
        span = active.span
        if span is None:
            return active.carried
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

    def _start(self, msg: Message) -> _Active:
        env = msg.envelope
        traceparent = env.traceparent
        if traceparent is not None and _NOT_SAMPLED.fullmatch(traceparent):
            return _Active(msg, None, None)
        stream = self._stream(msg)
        name = f"process {stream}"
        if traceparent is None and self._roots is not None:
            sampler, ids = self._roots
            trace_id = ids.generate_trace_id()
            decision = sampler.should_sample(None, trace_id, name, SpanKind.CONSUMER).decision
            if decision is Decision.DROP:
                carried = f"00-{trace_id:032x}-{ids.generate_span_id():016x}-00"
                return _Active(msg, None, (carried, None))
            ids.preset(trace_id)
        attributes: dict[str, AttributeValue] = {
            "messaging.system": "redis",
            "messaging.operation.type": "process",
            "messaging.destination.name": stream,
            "messaging.consumer.group.name": msg.stage,
            "messaging.message.id": msg.entry_id,
            "messaging.message.conversation_id": msg.task_id,
        }
        if msg.attempt > 1:
            attributes["pipeline.attempt"] = msg.attempt
        span = self._tracer.start_span(
            name,
            context=parent_context(traceparent, env.tracestate),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        if msg.deliveries > 1 and span.is_recording():  # reclaimed, or resumed after a restart
            span.set_attribute("pipeline.deliveries", msg.deliveries)
            span.add_event("redelivered", {"pipeline.deliveries": msg.deliveries})
        if not span.is_recording():  # the sampler said no after all: no span to keep
            return _Active(msg, None, format_context(span.get_span_context()))
        return _Active(msg, span, None)

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
        active = _active.get()
        if active is not None and active.span is None:
            return  # the task is not sampled
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
    """What the handler decided, where it is not the usual hand-on (the next span says that)."""
    if isinstance(outcome, Forward):
        body = outcome.body
        if isinstance(body, Answer):
            if body.coalesced:
                span.set_attribute("pipeline.coalesced", True)
            elif body.cached:
                span.set_attribute("pipeline.cache.hit", True)
        elif isinstance(body, Request):  # cache-check found nothing: on to the router
            span.set_attribute("pipeline.cache.hit", False)
        return
    if isinstance(outcome, Complete):
        return
    if isinstance(outcome, BaseException):
        kind = type(outcome).__name__
        if isinstance(outcome, Exception):  # an AuthError pause
            span.set_attribute("error.type", kind)
            span.set_status(Status(StatusCode.ERROR, kind))
        else:  # cancelled at shutdown: the entry is handed back for another worker
            span.add_event("handed_back")
        return
    span.set_attribute("pipeline.outcome", type(outcome).__name__.lower())  # retry, fail, …


class Tracing:
    """Tracing in one worker process: the hook to install, and shutdown (which flushes)."""

    def __init__(self, provider: trace.TracerProvider, app: App, keys: Keys, *, owned: bool):
        self.provider = provider
        tracer = provider.get_tracer(SCOPE, _version())
        if isinstance(provider, TracerProvider) and isinstance(provider.id_generator, PresetIds):
            self.hook = TracingHook(tracer, app, keys, provider.sampler, provider.id_generator)
        else:
            self.hook = TracingHook(tracer, app, keys)
        self._owned = owned
        self._unobserve = observe_calls(self.hook.on_call)
        # Each call once, as the `chat` span: Anthropic clients made from now on (the worker
        # builds its stages after this) leave out the SDK's own span, unless asked for.
        os.environ.setdefault("ANTHROPIC_OPEN_TELEMETRY", "false")

    def shutdown(self) -> None:
        """Stop watching calls; flush and close the provider if this process made it."""
        self._unobserve()
        if self._owned and isinstance(self.provider, TracerProvider):
            _close(self.provider)


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
    provider = _global_provider(environ)  # global: handlers' own spans join the task's trace
    return Tracing(provider, app, keys, owned=True)


@contextlib.contextmanager
def producer_tracing(environ: Mapping[str, str] = os.environ) -> Iterator[None]:
    """The `OTEL_*` provider for a process that only submits (`pipeline submit`), so that
    the client's `send` spans are exported; flushed when the block ends."""
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        yield
        return
    provider = _global_provider(environ)
    try:
        yield
    finally:
        _close(provider)


def _close(provider: TracerProvider, timeout_s: float = _FLUSH_TIMEOUT_S) -> None:
    """Flush and shut down, waiting at most `timeout_s`: with the collector down, the
    exporters' retries would hold a stopping process for half a minute. What is not sent
    by then is dropped."""
    closing = threading.Thread(target=provider.shutdown, daemon=True)
    closing.start()
    closing.join(timeout_s)
    if closing.is_alive():
        log.warning("tracing: spans not exported within %.0fs of stopping dropped", timeout_s)


def _global_provider(environ: Mapping[str, str]) -> TracerProvider:
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": _SERVICE_NAME}))
    provider = TracerProvider(resource=resource, id_generator=PresetIds())
    for exporter in _exporters(environ):
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


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
