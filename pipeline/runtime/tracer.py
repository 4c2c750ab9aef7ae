"""A traced entry as the runtime sees it: one span per handled entry, opened when the worker
takes it (by the tracing hook's `Hook.start_span`).

A tracer must cost next to nothing for an entry its trace does not sample (99 in 100 at
1%), so the runtime asks once, synchronously, and an entry the tracer leaves alone costs
that one call. The runtime knows nothing of OpenTelemetry: only W3C trace context travels,
as the `traceparent`/`tracestate` fields a producer in any language may XADD.
"""

from __future__ import annotations

from contextvars import Context
from typing import TYPE_CHECKING, Protocol

from pipeline.runtime.traceparent import TraceContext

if TYPE_CHECKING:
    from pipeline.runtime.outcome import Outcome

__all__ = ["EntrySpan", "TraceContext"]


class EntrySpan(Protocol):
    """A traced entry, from the worker taking it until its hand-off is decided."""

    def task_context(self) -> Context | None:
        """The context the handler's task runs in (its current span), or None for the
        worker's own."""

    def handoff(self, action: str, detail: str, delay_ms: int | None) -> TraceContext:
        """The runtime is building the entry that carries the task on: record the decision
        and return the trace context that entry carries.

        `action` is `forward` (detail: the target stage), `retry`, `defer` or `pause`
        (detail: the reason; `delay_ms`), or `dead_letter` (detail: the reason; the handler
        may not have run).
        """

    def finish(self, outcome: Outcome | BaseException | None) -> None:
        """What the handler decided (None: it never ran); called once, after any `handoff`."""
