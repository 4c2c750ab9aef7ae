"""The seam tracing plugs into: one span per handled entry, opened when the worker takes it.

Hooks (`pipeline.runtime.hooks`) are awaited for every entry; a tracer must cost next to nothing for
an entry its trace does not sample (99 in 100 at 1%). So the runtime asks the tracer once,
synchronously, when it takes an entry, and an entry the tracer leaves alone costs that one
call. The runtime knows nothing of OpenTelemetry: only W3C trace context travels, as the
`traceparent`/`tracestate` fields a producer in any language may XADD.
"""

from __future__ import annotations

from contextvars import Context
from typing import TYPE_CHECKING, Protocol

from pipeline.runtime.traceparent import TraceContext

if TYPE_CHECKING:
    from pipeline.runtime.outcome import Outcome
    from pipeline.runtime.stage import Message

__all__ = ["EntrySpan", "TraceContext", "Tracer"]


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


class Tracer(Protocol):
    def start(self, msg: Message) -> EntrySpan | None:
        """The entry's span, or None to leave the entry alone (its trace context goes on
        as it came). Must not raise."""
