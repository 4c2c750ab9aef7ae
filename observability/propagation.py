"""W3C trace context between stream fields and OpenTelemetry, and the producer's send spans.

A task's trace context travels as the `traceparent`/`tracestate` fields a producer in any
language may XADD, and then inside the envelope. Reading goes through the runtime's one
parser (`pipeline.runtime.traceparent`); writing formats the span context directly (no
carrier, no context object), since it happens for every entry a stage hands on. Only the
OpenTelemetry API is used here (the producer's process may have no SDK of ours).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    NonRecordingSpan,
    ProxyTracerProvider,
    SpanContext,
    SpanKind,
    TraceFlags,
    TraceState,
)

from pipeline.runtime.traceparent import TraceContext, TraceParent, parse

__all__ = ["EMPTY", "SCOPE", "format_context", "parent_context", "producer_spans", "remote_context"]

#: The instrumentation scope of every span the pipeline makes.
SCOPE = "claude-pipeline"
#: A context with nothing in it: a span started under it begins a new trace.
EMPTY = Context()


def parent_context(traceparent: str | None, tracestate: str | None) -> Context:
    """The remote parent a traceparent names; an empty context (a new trace) if none or bad."""
    parsed = parse(traceparent)
    return EMPTY if parsed is None else remote_context(parsed, tracestate)


def remote_context(parent: TraceParent, tracestate: str | None) -> Context:
    """A context whose current span is the remote parent `parent` names."""
    state = TraceState.from_header([tracestate]) if tracestate else None
    span_context = SpanContext(
        int(parent.trace_id, 16), int(parent.span_id, 16), True, TraceFlags(parent.flags), state
    )
    return trace.set_span_in_context(NonRecordingSpan(span_context), EMPTY)


def format_context(ctx: SpanContext) -> TraceContext | None:
    """`ctx` as (traceparent, tracestate) stream fields; None for an invalid span context."""
    if not ctx.is_valid:
        return None
    traceparent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    return traceparent, (ctx.trace_state.to_header() or None) if ctx.trace_state else None


Sent = Callable[[Sequence[bytes]], None]


def _ignore(entry_ids: Sequence[bytes]) -> None:
    return None


@contextlib.contextmanager
def producer_spans(stream: str, tasks: Sequence[dict[str, str]]) -> Iterator[Sent]:
    """A `send <stream>` PRODUCER span per task, its context written into the task's fields.

    Uses the application's global tracer provider; without one (OpenTelemetry imported but
    not set up) the fields are left alone. A traceparent the caller gave is the parent, so
    the caller's trace goes on through the producer span. Call the yielded function with the
    XADD replies to record the entry ids; the spans end when the block does.
    """
    provider = trace.get_tracer_provider()
    if isinstance(provider, ProxyTracerProvider):
        yield _ignore
        return
    tracer = provider.get_tracer(SCOPE)
    name = f"send {stream}"
    spans = []
    for fields in tasks:
        given = fields.get("traceparent")
        parent = parent_context(given, fields.get("tracestate")) if given else None
        span = tracer.start_span(name, context=parent, kind=SpanKind.PRODUCER)
        if span.is_recording():
            span.set_attributes(
                {
                    "messaging.system": "redis",
                    "messaging.operation.type": "send",
                    "messaging.operation.name": "xadd",
                    "messaging.destination.name": stream,
                }
            )
        carried = format_context(span.get_span_context())
        if carried is not None:
            fields["traceparent"] = carried[0]
            if carried[1]:
                fields["tracestate"] = carried[1]
        spans.append(span)

    def sent(entry_ids: Sequence[bytes]) -> None:
        for span, fields, entry_id in zip(spans, tasks, entry_ids, strict=True):
            if span.is_recording():
                eid = entry_id.decode()
                span.set_attribute("messaging.message.id", eid)
                span.set_attribute("messaging.message.conversation_id", fields.get("id") or eid)

    try:
        yield sent
    except BaseException as exc:
        for span in spans:
            if span.is_recording():
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
                span.set_attribute("error.type", type(exc).__name__)
        raise
    finally:
        for span in spans:
            span.end()
