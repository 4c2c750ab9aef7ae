"""W3C trace context as it travels with a task: the one parser of a `traceparent`.

A producer in any language may XADD `traceparent`/`tracestate`; the runtime keeps them
valid or drops them, results name the trace id, and tracing builds its remote parent from
what `parse` returns. Nothing else splits a traceparent.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["TRACEPARENT", "TraceContext", "TraceParent", "parse", "trace_id_of", "valid"]

#: A W3C trace context as it travels with a task: (traceparent, tracestate).
TraceContext = tuple[str, str | None]

#: A W3C traceparent: version (not ff), trace id and parent id (not all zeros), flags.
TRACEPARENT = re.compile(
    r"(?!ff)[0-9a-f]{2}-(?!0{32})([0-9a-f]{32})-(?!0{16})([0-9a-f]{16})-([0-9a-f]{2})"
)


class TraceParent(NamedTuple):
    trace_id: str  # 32 lowercase hex digits
    span_id: str  # 16 lowercase hex digits
    flags: int  # bit 0: sampled


def parse(traceparent: str | None) -> TraceParent | None:
    """The parts of a valid version-00 traceparent; None for a missing or bad one (W3C says:
    ignore it and start a new trace)."""
    if traceparent is None:
        return None
    match = TRACEPARENT.fullmatch(traceparent)
    if match is None:
        return None
    trace_id, span_id, flags = match.groups()
    return TraceParent(trace_id, span_id, int(flags, 16))


def valid(traceparent: str | None) -> bool:
    return parse(traceparent) is not None


def trace_id_of(traceparent: str | None) -> str:
    """The trace id a traceparent names, or "" (results carry it for lookups)."""
    parsed = parse(traceparent)
    return parsed.trace_id if parsed else ""
