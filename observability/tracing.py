"""One OpenTelemetry trace per task, across every stage, made with the SDK's own spans.

`Tracing` is the worker's tracing hook (`pipeline.runtime.hooks.Hook.start_span`):

- each stage's handling of an entry is a `process <stream>` CONSUMER span (messaging
  conventions), a child of the span that sent the entry (the producer's, or the stage
  before), so the producer's trace goes on; with no traceparent the first stage starts one;
- the span's context goes into the entry the stage hands on, so the next stage, a retry,
  the DLQ entry and the result's `trace_id` all carry the same trace;
- each model call is a `chat <model>` CLIENT span (GenAI conventions) under the stage span;
- the time a stage held a task outside its streams (waiting for a batch) is a `wait <stream>`
  span beside the stage's, with the batch's id;
- retries, deferrals, pauses, dead letters and redeliveries are span events; cache hits an
  attribute.

The stages follow the trace's sampled flag, as the SDK's default parent-based sampler does:
an entry whose trace is not sampled costs one parse of its traceparent; a new trace asks the
provider's sampler. Handlers run with the stage span current, so their own spans join the
task's trace. The provider is the application's when it set one (with or without `OTEL_*`),
else the one the `OTEL_*` variables describe (`observability.otel`). The Anthropic SDK (2.x)
would also make an `anthropic.messages.create` span per call; the pipeline's clients leave
it out (unless `ANTHROPIC_OPEN_TELEMETRY` is set) so each call appears once, as `chat`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from contextvars import Context, copy_context

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from observability.otel import (
    SCOPE,
    app_tracer_provider,
    close_tracer_provider,
    tracer_provider_from_env,
    version,
)
from observability.propagation import EMPTY, format_context, remote_context
from pipeline.runtime.calls import CallReport
from pipeline.runtime.held import HeldReport
from pipeline.runtime.hooks import Hook
from pipeline.runtime.keys import Keys
from pipeline.runtime.outcome import Complete, Forward, Outcome
from pipeline.runtime.stage import App, Message
from pipeline.runtime.traceparent import TraceContext, parse

__all__ = ["StageSpan", "Tracing", "producer_tracing", "start_tracing"]

#: Reasons are error messages (never prompts); long ones are cut on spans.
_MAX_REASON_CHARS = 300


class StageSpan:
    """A sampled entry's stage span (the runtime's `EntrySpan`): the current span while its
    handler runs; the runtime, not the handler, ends it once the hand-off is decided."""

    __slots__ = ("span",)

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def task_context(self) -> Context:
        context = copy_context()  # what create_task would take, with this span current
        context.run(otel_context.attach, trace.set_span_in_context(self.span, EMPTY))
        return context

    def handoff(self, action: str, detail: str, delay_ms: int | None) -> TraceContext:
        span = self.span
        if action != "forward":
            event: dict[str, AttributeValue] = {"pipeline.reason": detail[:_MAX_REASON_CHARS]}
            if delay_ms is not None:
                event["pipeline.delay_ms"] = delay_ms
                span.set_attribute(f"pipeline.{action}.delay_ms", delay_ms)
            span.add_event(action, event)
            if action == "dead_letter":
                span.set_status(Status(StatusCode.ERROR, detail[:_MAX_REASON_CHARS]))
        carried = format_context(span.get_span_context())
        assert carried is not None  # a recording span's context is valid
        return carried

    def finish(self, outcome: Outcome | BaseException | None) -> None:
        if outcome is not None:
            _record_outcome(self.span, outcome)
        self.span.end()


class _NotSampled:
    """A new trace its root sampler said no to: the stages after carry the decision on."""

    __slots__ = ("carried",)

    def __init__(self, carried: TraceContext) -> None:
        self.carried = carried

    def task_context(self) -> None:
        return None

    def handoff(self, action: str, detail: str, delay_ms: int | None) -> TraceContext:
        return self.carried

    def finish(self, outcome: Outcome | BaseException | None) -> None:
        return None


class Tracing(Hook):
    """Tracing in one worker process: stage spans, model-call spans, and shutdown (which
    flushes)."""

    def __init__(
        self, provider: trace.TracerProvider, app: App, keys: Keys, *, owned: bool = False
    ) -> None:
        """`owned`: this process made `provider` (shut it down at the end; else only flush)."""
        self.provider = provider
        self._tracer = provider.get_tracer(SCOPE, version())
        self._app = app
        self._keys = keys
        self._owned = owned
        self._streams: dict[tuple[str, str | None], tuple[str, dict[str, AttributeValue]]] = {}

    def start_span(self, msg: Message) -> StageSpan | _NotSampled | None:
        env = msg.envelope
        parent = parse(env.traceparent)
        if parent is None:
            context = EMPTY
        elif not parent.flags & 1:
            return None  # not sampled upstream: its context goes on as it came
        else:
            context = remote_context(parent, env.tracestate)
        name, attributes = self._streams.get((msg.stage, msg.lane)) or self._stream(msg)
        span = self._tracer.start_span(
            name,
            context=context,
            kind=SpanKind.CONSUMER,
            attributes={
                **attributes,
                "messaging.message.id": msg.entry_id,
                "messaging.message.conversation_id": msg.task_id,
            },
        )
        if not span.is_recording():  # a new trace the sampler said no to
            carried = format_context(span.get_span_context())
            return None if carried is None else _NotSampled(carried)
        if msg.attempt > 1:
            span.set_attribute("pipeline.attempt", msg.attempt)
        if msg.deliveries > 1:  # reclaimed, or resumed after a restart
            span.set_attribute("pipeline.deliveries", msg.deliveries)
            span.add_event("redelivered", {"pipeline.deliveries": msg.deliveries})
        return StageSpan(span)

    def _stream(self, msg: Message) -> tuple[str, dict[str, AttributeValue]]:
        stream = self._keys.stream(self._app.stage(msg.stage).stream, msg.lane)
        attributes: dict[str, AttributeValue] = {
            "messaging.system": "redis",
            "messaging.operation.type": "process",
            "messaging.destination.name": stream,
            "messaging.consumer.group.name": msg.stage,
        }
        found = self._streams[msg.stage, msg.lane] = (f"process {stream}", attributes)
        return found

    def on_call(self, report: CallReport) -> None:
        """A `chat <model>` CLIENT span under the stage span, when the entry is sampled."""
        if not trace.get_current_span().is_recording():
            return  # not sampled, or not inside a stage
        span = self._tracer.start_span(
            f"chat {report.request_model}",
            kind=SpanKind.CLIENT,
            attributes=_call_attributes(report),
            start_time=report.started_ns,
        )
        if report.error_type is not None:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=report.ended_ns)

    def on_release(self, report: HeldReport) -> None:
        """A `wait <stream>` span for the time a stage held a task outside its streams (the
        batch lane: shelved until answered), in the task's trace, with the stage's
        attributes (the batch's id)."""
        parent = parse(report.traceparent)
        if parent is None or not parent.flags & 1:
            return  # no trace to join, or not sampled
        stream = self._keys.stream(self._app.stage(report.stage).stream, report.lane)
        attributes: dict[str, AttributeValue] = {
            "messaging.system": "redis",
            "messaging.destination.name": stream,
            "messaging.message.conversation_id": report.task_id,
            "pipeline.held.outcome": report.outcome,
            **(report.attributes or {}),
        }
        span = self._tracer.start_span(
            f"wait {stream}",
            context=remote_context(parent, report.tracestate),
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=report.held_ns or report.released_ns,
        )
        span.end(end_time=report.released_ns)

    def shutdown(self) -> None:
        """Flush what is queued; shut the provider down if this process made it."""
        close_tracer_provider(self.provider, self._owned)


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
        # The cache counts only when the prompt used the cache (each attribute is CPU on
        # every span: encoded, sent and stored).
        if usage.cache_read_input_tokens:
            attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cache_read_input_tokens
        if usage.cache_creation_input_tokens:
            attributes["gen_ai.usage.cache_creation.input_tokens"] = (
                usage.cache_creation_input_tokens
            )
    if report.error_type is not None:
        # Low cardinality: the HTTP status when there is one, else the error class.
        attributes["error.type"] = str(report.status) if report.status else report.error_type
    return attributes


def _record_outcome(span: trace.Span, outcome: Outcome | BaseException) -> None:
    """What the handler decided, where it is not the usual hand-on (the next span says that).

    Bodies are read by their fields, not their types: answers say whether they were
    `cached` or `coalesced`, and cache-check handing a task on to the router is a miss.
    """
    if isinstance(outcome, Forward):
        body = outcome.body
        if getattr(body, "coalesced", False):
            span.set_attribute("pipeline.coalesced", True)
        elif getattr(body, "cached", False):
            span.set_attribute("pipeline.cache.hit", True)
        elif outcome.to == "router":  # cache-check found nothing
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


def start_tracing(
    app: App, keys: Keys, service_name: str, environ: Mapping[str, str] = os.environ
) -> Tracing:
    """Tracing on the application's provider if it set one, else on the one the `OTEL_*`
    variables describe (made global; `service_name` unless they name a service)."""
    provider = app_tracer_provider()
    if provider is not None:
        return Tracing(provider, app, keys)
    return Tracing(tracer_provider_from_env(environ, service_name), app, keys, owned=True)


@contextlib.contextmanager
def producer_tracing(environ: Mapping[str, str] = os.environ) -> Iterator[None]:
    """The `OTEL_*` provider for a process that only submits (`pipeline submit`), so that
    the client's `send` spans are exported; flushed when the block ends."""
    if app_tracer_provider() is not None:
        yield
        return
    provider = tracer_provider_from_env(environ, "pipeline-producer")
    try:
        yield
    finally:
        close_tracer_provider(provider, owned=True)
