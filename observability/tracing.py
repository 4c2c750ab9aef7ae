"""One OpenTelemetry trace per task, across every stage (DESIGN: Observability).

The runtime knows nothing of OpenTelemetry; it asks a `pipeline.runtime.tracer.Tracer` about each
entry it takes. `Tracing` is that tracer, set up by `start_tracing` when the `OTEL_*`
variables ask for traces:

- each stage's handling of an entry is a `process <stream>` CONSUMER span (messaging
  conventions), a child of the span that sent the entry (the producer's, or the stage
  before), so the producer's trace goes on; with no traceparent the first stage starts one;
- the span's context goes into the entry the stage hands on, so the next stage, a retry,
  the DLQ entry and the result's `trace_id` all carry the same trace;
- each Messages call is a `chat <model>` CLIENT span (GenAI conventions) under the stage span;
- retries, deferrals, pauses, dead letters and redeliveries are span events; cache hits an
  attribute.

Cost is the design: the stages follow the trace's sampled flag (as the default parent-based
samplers do), so an entry whose trace is not sampled costs one method call; a new trace
costs a random number and, when not sampled, a formatted traceparent. Sampled spans are
`SpanData` records (`observability.spans`), not SDK spans: they go straight to the OTLP
collector (`span_export.OtlpExport`), or, under a tracer provider the application set up
itself, into its processors (`span_export.SdkExport`). Handlers see the stage span as the
current OpenTelemetry span, so their own spans (made with the SDK) join the task's trace.
The anthropic SDK (2.x) would also emit an `anthropic.messages.create` span per call;
`Tracing` turns that off (unless `ANTHROPIC_OPEN_TELEMETRY` is set) so each call appears
once, as the `chat` span.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextvars import Context, ContextVar, copy_context
from random import getrandbits

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context as OtelContext
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace import propagation as trace_propagation
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes, AttributeValue

from observability.otlp_encode import Encoder
from observability.propagation import SCOPE
from observability.span_export import OtlpExport, SdkExport, SpanExport, batch_settings
from observability.spans import CLIENT, CONSUMER, ERROR, SpanData, SpanShape
from pipeline.claude.call_report import CallReport, observe_calls
from pipeline.claude.task import Answer, Request
from pipeline.runtime.errors import ConfigError
from pipeline.runtime.keys import Keys
from pipeline.runtime.outcome import Complete, Forward, Outcome
from pipeline.runtime.stage import App, Message
from pipeline.runtime.traceparent import TraceContext

__all__ = ["StageSpan", "Tracing", "producer_tracing", "start_tracing"]

log = logging.getLogger(__name__)
#: Reasons are error messages (never prompts); long ones are cut on spans.
_MAX_REASON_CHARS = 300
_SERVICE_NAME = "claude-pipeline"
_FLUSH_TIMEOUT_S = 5.0
_OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}
#: The last hex digit of a traceparent whose sampled flag (bit 0 of the flags) is off.
_NOT_SAMPLED = frozenset("02468ace")
_ID_BITS = TraceIdRatioBased.TRACE_ID_LIMIT
_NO_CONTEXT = OtelContext()
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def _new_span_id() -> str:
    return (getrandbits(64) or 1).to_bytes(8, "big").hex()


def _current_context_var() -> ContextVar[OtelContext] | None:
    """OpenTelemetry's current-context variable, when it keeps the context in one (the
    default `contextvars_context`) and its span key is where this version keeps it; None
    otherwise (the API's `attach` is used then)."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    if not isinstance(runtime, ContextVarsRuntimeContext) or not isinstance(_SPAN_KEY, str):
        return None
    var = getattr(runtime, "_current_context", None)
    return var if isinstance(var, ContextVar) else None


#: Private to the API, read once: where a context holds its current span.
_SPAN_KEY: object = getattr(trace_propagation, "_SPAN_KEY", None)
_CURRENT_CONTEXT = _current_context_var()


class StageSpan(SpanData, trace.Span):
    """A sampled entry's stage span: the runtime's `EntrySpan`, and the current
    OpenTelemetry span while its handler runs (handlers may add attributes and events;
    the runtime, not the handler, ends it)."""

    __slots__ = ("_ended", "_export")

    def __init__(self, export: SpanExport, shape: SpanShape, trace_id: str, parent_id: str | None,
                 msg: Message, trace_state: str | None) -> None:  # fmt: skip
        # SpanData's fields, set here directly: one span per entry and stage.
        self.shape = shape
        self.trace_id = trace_id
        self.span_id = (getrandbits(64) or 1).to_bytes(8, "big").hex()  # _new_span_id(), inline
        self.parent_id = parent_id
        self.remote_parent = True
        self.trace_state = trace_state
        self.start_ns = self.end_ns = time.time_ns()
        self.values = (msg.entry_id, msg.task_id)
        self.attributes = self.events = self.status = None
        self._export = export
        self._ended = False

    # ---- the runtime's EntrySpan ------------------------------------------------------------

    def task_context(self) -> Context:
        context = copy_context()  # (what create_task would do without one)
        if _CURRENT_CONTEXT is None:
            context.run(otel_context.attach, trace.set_span_in_context(self, _NO_CONTEXT))
        else:  # the same, without the API's frames: a context holding only this span
            context.run(_CURRENT_CONTEXT.set, OtelContext({_SPAN_KEY: self}))  # type: ignore[dict-item]
        return context

    def handoff(self, action: str, detail: str, delay_ms: int | None) -> TraceContext:
        if action != "forward" and not self._ended:
            event: dict[str, AttributeValue] = {"pipeline.reason": detail[:_MAX_REASON_CHARS]}
            if delay_ms is not None:
                event["pipeline.delay_ms"] = delay_ms
                self.set_attribute(f"pipeline.{action}.delay_ms", delay_ms)
            self.add_event(action, event)
            if action == "dead_letter":
                self.status = (ERROR, detail[:_MAX_REASON_CHARS])
        return f"00-{self.trace_id}-{self.span_id}-01", self.trace_state

    def finish(self, outcome: Outcome | BaseException | None) -> None:
        if self._ended:
            return
        if outcome is not None:
            _record_outcome(self, outcome)
        self._ended = True
        self.end_ns = time.time_ns()
        self._export.add(self)

    # ---- the OpenTelemetry Span API, for handlers ---------------------------------------------

    def end(self, end_time: int | None = None) -> None:
        """A handler's `end()` (e.g. leaving `with span:`) does nothing: a stage span lasts
        until the runtime has decided the hand-off."""

    def get_span_context(self) -> SpanContext:
        state = TraceState.from_header([self.trace_state]) if self.trace_state else None
        return SpanContext(int(self.trace_id, 16), int(self.span_id, 16), False, _SAMPLED, state)

    def is_recording(self) -> bool:
        return not self._ended

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._ended:  # queued for export: no longer ours to change
            return
        if self.attributes is None:
            self.attributes = {}
        self.attributes[key] = value

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._ended:
            return
        if self.events is None:
            self.events = []
        self.events.append((name, timestamp or time.time_ns(), dict(attributes or {})))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        """Links are not recorded on stage spans."""

    def update_name(self, name: str) -> None:
        """A stage span keeps its conventional name (`process <stream>`)."""

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._ended:
            return
        code = status.status_code if isinstance(status, Status) else status
        if code is StatusCode.ERROR:
            text = status.description if isinstance(status, Status) else description
            self.status = (ERROR, text or "")
        elif code is StatusCode.OK:
            self.status = None

    def record_exception(
        self, exception: BaseException, attributes: Attributes = None,
        timestamp: int | None = None, escaped: bool = False,
    ) -> None:  # fmt: skip
        event: dict[str, AttributeValue] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception)[:_MAX_REASON_CHARS],
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
        }
        event.update(attributes or {})
        self.add_event("exception", event, timestamp)


class _NotSampled:
    """A new trace its root sampler said no to: the stages after carry the decision on."""

    __slots__ = ("carried",)

    def __init__(self, trace_id: int) -> None:
        span_id = getrandbits(64) or 1
        # (printf-style: measurably cheaper than format specifiers, once per entry at 1%)
        self.carried: TraceContext = ("00-%032x-%016x-00" % (trace_id, span_id), None)  # noqa: UP031

    def task_context(self) -> None:
        return None

    def handoff(self, action: str, detail: str, delay_ms: int | None) -> TraceContext:
        return self.carried

    def finish(self, outcome: Outcome | BaseException | None) -> None:
        return None


#: Whether a new trace (its 128-bit id) is sampled.
RootSampler = Callable[[int], bool]


class Tracing:
    """Tracing in one worker process: the runtime's tracer, the Claude call spans, and
    shutdown (which flushes)."""

    def __init__(
        self, provider: TracerProvider, app: App, keys: Keys, *, export: SpanExport | None = None,
        sample_root: RootSampler | None = None, owned: bool = False,
    ) -> None:  # fmt: skip
        """`export` defaults to the provider's own processors; `sample_root` to asking the
        provider's sampler."""
        self.provider = provider
        self._app = app
        self._keys = keys
        self._export = export or SdkExport(provider, SCOPE, _version())
        self._sample_root = sample_root or _asking(provider.sampler)
        self._owned = owned
        self._shapes: dict[tuple[str, str | None], SpanShape] = {}
        self._chat_shapes: dict[str, SpanShape] = {}
        self._unobserve = observe_calls(self.on_call)
        # Each call once, as the `chat` span: Anthropic clients made from now on (the worker
        # builds its stages after this) leave out the SDK's own span, unless asked for.
        os.environ.setdefault("ANTHROPIC_OPEN_TELEMETRY", "false")

    def start(self, msg: Message) -> StageSpan | _NotSampled | None:
        env = msg.envelope
        traceparent = env.traceparent
        if traceparent is None:
            trace_id = getrandbits(128) or 1
            if not self._sample_root(trace_id):
                return _NotSampled(trace_id)
            trace_hex, parent_id, trace_state = f"{trace_id:032x}", None, None
        elif traceparent[-1] in _NOT_SAMPLED:
            return None
        else:  # valid: checked at ingress (pipeline.runtime.wire), written by a stage after that
            trace_hex, parent_id = traceparent[3:35], traceparent[36:52]
            trace_state = env.tracestate
        shape = self._shapes.get((msg.stage, msg.lane)) or self._new_shape(msg)
        span = StageSpan(self._export, shape, trace_hex, parent_id, msg, trace_state)
        if msg.attempt > 1:
            span.set_attribute("pipeline.attempt", msg.attempt)
        if msg.deliveries > 1:  # reclaimed, or resumed after a restart
            span.set_attribute("pipeline.deliveries", msg.deliveries)
            span.add_event("redelivered", {"pipeline.deliveries": msg.deliveries})
        return span

    def _new_shape(self, msg: Message) -> SpanShape:
        stream = self._keys.stream(self._app.stage(msg.stage).stream, msg.lane)
        shape = self._shapes[msg.stage, msg.lane] = SpanShape(
            f"process {stream}",
            CONSUMER,
            {
                "messaging.system": "redis",
                "messaging.operation.type": "process",
                "messaging.destination.name": stream,
                "messaging.consumer.group.name": msg.stage,
            },
            ("messaging.message.id", "messaging.message.conversation_id"),
        )
        return shape

    def on_call(self, report: CallReport) -> None:
        """A `chat <model>` CLIENT span under the stage span, when the entry is sampled."""
        stage = trace.get_current_span()
        if not isinstance(stage, StageSpan):
            return  # not sampled, or not inside a stage
        model = report.request_model
        shape = self._chat_shapes.get(model)
        if shape is None:
            shape = self._chat_shapes[model] = SpanShape(f"chat {model}", CLIENT, {
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
                "gen_ai.request.model": model,
            })  # fmt: skip
        span = SpanData(
            shape, stage.trace_id, _new_span_id(), stage.span_id,
            report.started_ns, remote_parent=False, trace_state=stage.trace_state,
        )  # fmt: skip
        span.end_ns = report.ended_ns
        span.attributes = _call_attributes(report)
        if report.error_type is not None:
            span.status = (ERROR, "")
        self._export.add(span)

    def shutdown(self) -> None:
        """Stop watching calls; flush what is queued, and close the provider if this
        process made it."""
        self._unobserve()
        self._export.shutdown(_FLUSH_TIMEOUT_S)
        if self._owned:
            _close(self.provider)


def _asking(sampler: Sampler) -> RootSampler:
    def sample_root(trace_id: int) -> bool:
        result = sampler.should_sample(None, trace_id, "process", SpanKind.CONSUMER)
        return bool(result.decision.is_sampled())  # type: ignore[no-untyped-call]

    return sample_root


def _ratio(bound: int) -> RootSampler:
    """The SDK's TraceIdRatioBased decision, without its result objects (a root per entry)."""

    def sample_root(trace_id: int) -> bool:
        return trace_id & _ID_BITS < bound

    return sample_root


def _env_sampler(environ: Mapping[str, str]) -> tuple[Sampler | None, RootSampler | None]:
    """The `OTEL_TRACES_SAMPLER` sampler and, for the built-in ones, its root decision.

    Others (samplers from entry points) are left to the SDK: (None, None).
    """
    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    base = name.removeprefix("parentbased_")
    if base == "always_on":
        rate = 1.0
    elif base == "always_off":
        rate = 0.0
    elif base == "traceidratio":
        raw = environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
        try:
            rate = float(raw)
        except ValueError:
            raise ConfigError("OTEL_TRACES_SAMPLER_ARG", f"{raw!r} is not a number") from None
        if not 0.0 <= rate <= 1.0:
            raise ConfigError("OTEL_TRACES_SAMPLER_ARG", f"{rate} is not between 0 and 1")
    else:
        return None, None
    root: Sampler = (
        ALWAYS_ON if rate == 1.0 else ALWAYS_OFF if rate == 0.0 else TraceIdRatioBased(rate)
    )
    sampler = ParentBased(root) if name.startswith("parentbased_") else root
    return sampler, _ratio(TraceIdRatioBased.get_bound_for_rate(rate))


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


def _record_outcome(span: StageSpan, outcome: Outcome | BaseException) -> None:
    """What the handler decided, where it is not the usual hand-on (the next span says that)."""
    if isinstance(outcome, Forward):
        body = outcome.body
        if body.__class__ is dict:  # the usual body of a custom stage: nothing to record
            return
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


def start_tracing(app: App, keys: Keys, environ: Mapping[str, str] = os.environ) -> Tracing:
    """Tracing as the `OTEL_*` variables configure it, the provider made global.

    The variables mean what they mean to the SDK: the sampler (`OTEL_TRACES_SAMPLER`,
    `_ARG`), the resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`), the batch
    processor (`OTEL_BSP_*`), the exporter (`OTEL_TRACES_EXPORTER`, default `otlp`) and the
    OTLP endpoint, protocol (default `grpc`, as in the Python SDK), headers, timeout,
    compression and certificates. With OTLP the only exporter (the usual case) the stage spans
    go to the collector directly; the provider, made global, serves handlers' own spans. A
    provider the application already set (e.g. under `opentelemetry-instrument`) is used as
    it is, for every span.
    """
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return Tracing(current, app, keys)
    sampler, sample_root = _env_sampler(environ)
    provider = _global_provider(environ, sampler)
    if _exporter_names(environ) != ["otlp"]:
        return Tracing(provider, app, keys, sample_root=sample_root, owned=True)
    from observability.otlp_sender import sender_from_env

    resource = provider.resource
    encoder = Encoder(resource.attributes, SCOPE, _version(), resource.schema_url)
    export = OtlpExport(encoder, sender_from_env(environ), batch_settings(environ))
    return Tracing(provider, app, keys, export=export, sample_root=sample_root, owned=True)


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


def _global_provider(environ: Mapping[str, str], sampler: Sampler | None = None) -> TracerProvider:
    """The SDK provider the `OTEL_*` variables describe (None: the SDK's own sampler)."""
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": _SERVICE_NAME}))
    provider = TracerProvider(resource=resource, sampler=sampler)
    for exporter in _exporters(environ):
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    return [n for n in names if n not in ("", "none")]


def _exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in _exporter_names(environ):
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
