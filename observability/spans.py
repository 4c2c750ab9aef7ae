"""The pipeline's spans as plain records, before any exporter sees them.

An SDK span (a lock, bounded attribute maps, processor callbacks, then a protobuf object per
attribute at export) costs the runtime more than handling the entry itself. A stage span
here is one small object: what every span of a stage stream shares (name, kind, constant
attributes) is a `SpanShape`, encoded once; the span holds its ids, times and a few values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from opentelemetry.util.types import AttributeValue

from observability.otlp_encode import encode_shape

__all__ = ["CLIENT", "CONSUMER", "ERROR", "PRODUCER", "Event", "SpanData", "SpanShape"]

#: OTLP span kinds and status codes (opentelemetry/proto/trace/v1/trace.proto).
CLIENT: Final = 3
PRODUCER: Final = 4
CONSUMER: Final = 5
ERROR: Final = 2

Attributes = dict[str, AttributeValue]
#: An event: (name, time in ns, attributes).
Event = tuple[str, int, Attributes]


class SpanShape:
    """What every span of one kind shares: its name, kind and constant attributes, and the
    names of the string attributes each span gives a value for (`SpanData.values`)."""

    __slots__ = ("attributes", "encoded", "keys", "kind", "name")

    def __init__(
        self, name: str, kind: int, attributes: Mapping[str, AttributeValue],
        keys: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        self.name = name
        self.kind = kind
        self.attributes = dict(attributes)
        self.keys = keys
        self.encoded = encode_shape(name, kind, self.attributes, keys)


class SpanData:
    """A span: ids as W3C hex (as they travel and are encoded), times in ns since the epoch."""

    __slots__ = (
        "attributes", "end_ns", "events", "parent_id", "remote_parent", "shape", "span_id",
        "start_ns", "status", "trace_id", "trace_state", "values",
    )  # fmt: skip

    def __init__(
        self, shape: SpanShape, trace_id: str, span_id: str, parent_id: str | None,
        start_ns: int, values: tuple[str, ...] = (), *, remote_parent: bool = True,
        trace_state: str | None = None,
    ) -> None:  # fmt: skip
        self.shape = shape
        self.trace_id = trace_id  # 32 hex digits
        self.span_id = span_id  # 16 hex digits
        self.parent_id = parent_id  # 16 hex digits; None for a trace's root
        self.remote_parent = remote_parent  # the parent span was made in another process
        self.trace_state = trace_state
        self.start_ns = self.end_ns = start_ns
        self.values = values  # one per shape.keys
        self.attributes: Attributes | None = None  # the rarer ones, set as they come
        self.events: list[Event] | None = None
        self.status: tuple[int, str] | None = None  # (code, description)

    def all_attributes(self) -> Attributes:
        out = {**self.shape.attributes, **dict(zip(self.shape.keys, self.values, strict=True))}
        if self.attributes:
            out.update(self.attributes)
        return out
