"""Where finished spans go: straight to an OTLP collector, or into an application's SDK.

`OtlpExport` batches spans on a background thread as the SDK's BatchSpanProcessor does (and
with its `OTEL_BSP_*` settings), encodes them with `otlp_encode` and sends them with
`otlp_sender`. `SdkExport` turns them into SDK `ReadableSpan`s for a tracer provider the
application set up itself (its processors and exporters, e.g. under `opentelemetry-instrument`
or a test's in-memory exporter).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple, Protocol

from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from observability.otlp_encode import Encoder, encode_span
from observability.spans import SpanData

if TYPE_CHECKING:
    from observability.otlp_sender import OtlpSender

__all__ = ["BatchSettings", "OtlpExport", "SdkExport", "SpanExport", "batch_settings"]

log = logging.getLogger(__name__)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class SpanExport(Protocol):
    def add(self, span: SpanData) -> None: ...
    def shutdown(self, timeout_s: float) -> None: ...


class BatchSettings(NamedTuple):
    delay_s: float = 5.0
    max_queue: int = 2048
    batch: int = 512
    timeout_s: float = 30.0


def batch_settings(environ: Mapping[str, str]) -> BatchSettings:
    """The batch span processor's `OTEL_BSP_*` variables, with the SDK's defaults."""

    def number(name: str, default: int) -> int:
        raw = environ.get(name, "").strip()
        try:
            return int(raw) if raw else default
        except ValueError:
            log.warning("tracing: %s=%r is not a whole number; using %d", name, raw, default)
            return default

    return BatchSettings(
        delay_s=number("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000,
        max_queue=number("OTEL_BSP_MAX_QUEUE_SIZE", 2048),
        batch=number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
        timeout_s=number("OTEL_BSP_EXPORT_TIMEOUT", 30000) / 1000,
    )


class OtlpExport:
    """Spans encoded as the worker's loop finishes them, batched and sent by one thread.

    Encoding where the span ends keeps the span's objects out of the queue (they are freed
    at once, in the cache that made them) and leaves the thread only joining bytes and the
    network. The thread wakes every `delay_s`, or at once when a batch is full. A full queue
    drops spans (counted, logged once a minute) rather than slowing the worker, as the SDK's
    processor does.
    """

    def __init__(
        self, encoder: Encoder, sender: OtlpSender, settings: BatchSettings | None = None
    ) -> None:
        settings = settings or BatchSettings()
        self._encoder = encoder
        self._sender = sender
        self._delay_s = settings.delay_s
        self._max_queue = settings.max_queue
        self._batch = max(1, min(settings.batch, settings.max_queue))
        self._timeout_s = settings.timeout_s
        # A list: appends here and slices there are each one step under the GIL.
        self._queue: list[bytes] = []
        self._wake = threading.Event()
        self._stopping = False
        self.dropped = 0
        self.sent = 0
        self._dropped_logged_at = -60.0
        self._thread = threading.Thread(target=self._run, name="otlp-spans", daemon=True)
        self._thread.start()

    def add(self, span: SpanData) -> None:
        queue = self._queue
        if len(queue) >= self._max_queue:
            self._drop(1, "the queue is full (OTEL_BSP_MAX_QUEUE_SIZE)")
            return
        try:
            encoded = encode_span(span)
        except ValueError:  # ids that are not hex: a hand-made envelope
            self._drop(1, f"a {span.shape.name!r} span's trace context is malformed")
            return
        queue.append(encoded)
        if len(queue) >= self._batch and not self._wake.is_set():
            self._wake.set()

    def shutdown(self, timeout_s: float) -> None:
        """Send what is queued, waiting at most `timeout_s`; what is left then is dropped."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("tracing: spans not exported within %.0fs of stopping dropped", timeout_s)
        self._sender.close()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self._send_guarded()
        self._send_guarded()

    def _send_guarded(self) -> None:
        try:
            self._send_queued()
        except Exception:  # a bug here must not end the thread (the queue would only fill)
            log.exception("tracing: exporting spans failed")

    def _send_queued(self) -> None:
        queue = self._queue
        while queue:
            batch = queue[: self._batch]
            del queue[: len(batch)]  # the worker only appends: these are the ones taken
            if self._sender.send(self._encoder.request(batch), self._timeout_s):
                self.sent += len(batch)
            else:
                where = self._sender.endpoint
                self._drop(len(batch), f"the collector at {where} did not take them")

    def _drop(self, n: int, why: str) -> None:
        self.dropped += n
        now = time.monotonic()
        if now - self._dropped_logged_at >= 60:
            self._dropped_logged_at = now
            log.warning("tracing: %d spans dropped so far: %s", self.dropped, why)


class SdkExport:
    """Spans as SDK `ReadableSpan`s, ended into the provider's span processors."""

    def __init__(self, provider: TracerProvider, scope: str, version: str) -> None:
        # The SDK has no public way to end a span made elsewhere; its processor list is it.
        self._processor = provider._active_span_processor
        self._resource = provider.resource
        self._scope = InstrumentationScope(scope, version)

    def add(self, span: SpanData) -> None:
        self._processor.on_end(self.readable(span))

    def readable(self, span: SpanData) -> ReadableSpan:
        trace_id = int(span.trace_id, 16)
        state = TraceState.from_header([span.trace_state]) if span.trace_state else None
        context = SpanContext(trace_id, int(span.span_id, 16), False, _SAMPLED, state)
        parent = None
        if span.parent_id is not None:
            parent_id = int(span.parent_id, 16)
            parent = SpanContext(trace_id, parent_id, span.remote_parent, _SAMPLED, state)
        status = Status(StatusCode.UNSET)
        if span.status is not None:
            status = Status(StatusCode.ERROR, span.status[1] or None)
        return ReadableSpan(
            name=span.shape.name,
            context=context,
            parent=parent,
            resource=self._resource,
            attributes=span.all_attributes(),
            events=[Event(name, attrs, time_ns) for name, time_ns, attrs in span.events or ()],
            kind=SpanKind(span.shape.kind - 1),  # the API counts from INTERNAL = 0, OTLP from 1
            instrumentation_scope=self._scope,
            status=status,
            start_time=span.start_ns,
            end_time=span.end_ns,
        )

    def shutdown(self, timeout_s: float) -> None:
        """The application owns the provider: it flushes and shuts it down."""
