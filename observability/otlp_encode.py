"""OTLP/protobuf bytes for the pipeline's spans, at a couple of microseconds a span.

The SDK's exporters build a protobuf object per span, attribute and value (~50 us a span).
Here what spans share is encoded once with the official generated classes (the resource,
the scope, each shape's name, kind and constant attributes), and so are a span's rarer
parts (events, status, extra attributes). Per span only the hot fields are written by the
wire format's rules, in as few calls as Python allows: the three ids with their tags are one
hex string made bytes at once, the two times one `struct` call, and each string attribute a
lookup of its field's head by the value's length, then the value. Protobuf merges
concatenated encodings of one message, which is what lets the parts be joined. Field
numbers come from the generated descriptors.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from opentelemetry.util.types import AttributeValue

if TYPE_CHECKING:
    from observability.spans import SpanData

__all__ = ["EncodedShape", "Encoder", "encode_shape", "encode_span"]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_FIELDS = Span.DESCRIPTOR.fields_by_name
#: Span flags: the parent's is-remote bit is known (0x100), and set (0x200); low byte W3C.
_HAS_IS_REMOTE, _IS_REMOTE, _SAMPLED = 0x100, 0x200, 0x01


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _span_tag(name: str, wire_type: int) -> bytes:
    return _tag(_FIELDS[name].number, wire_type)


_SMALL = [_varint(n) for n in range(128)]
_TRACE_ID = _span_tag("trace_id", _LEN) + _SMALL[16]
_SPAN_ID = _span_tag("span_id", _LEN) + _SMALL[8]
_PARENT_ID = _span_tag("parent_span_id", _LEN) + _SMALL[8]
_TRACE_STATE = _span_tag("trace_state", _LEN)
_TRACE_ID_HEX, _SPAN_ID_HEX, _PARENT_ID_HEX = _TRACE_ID.hex(), _SPAN_ID.hex(), _PARENT_ID.hex()
_ATTRIBUTE = _span_tag("attributes", _LEN)
_TIMES = struct.Struct(
    f"<{len(_span_tag('start_time_unix_nano', _I64))}sQ"
    f"{len(_span_tag('end_time_unix_nano', _I64))}sQ"
)
_START, _END = _span_tag("start_time_unix_nano", _I64), _span_tag("end_time_unix_nano", _I64)
_FLAGS = _span_tag("flags", _I32)
_FLAGS_LOCAL = _FLAGS + struct.pack("<I", _HAS_IS_REMOTE | _SAMPLED)  # or no parent
_FLAGS_REMOTE = _FLAGS + struct.pack("<I", _HAS_IS_REMOTE | _IS_REMOTE | _SAMPLED)
_KV_KEY = _tag(KeyValue.DESCRIPTOR.fields_by_name["key"].number, _LEN)
_KV_VALUE = _tag(KeyValue.DESCRIPTOR.fields_by_name["value"].number, _LEN)
_STRING_VALUE = _tag(AnyValue.DESCRIPTOR.fields_by_name["string_value"].number, _LEN)
_SCOPE_SPANS = _tag(ResourceSpans.DESCRIPTOR.fields_by_name["scope_spans"].number, _LEN)
_SPANS = _tag(ScopeSpans.DESCRIPTOR.fields_by_name["spans"].number, _LEN)
_RESOURCE_SPANS = _tag(1, _LEN)  # ExportTraceServiceRequest.resource_spans


def _len(n: int) -> bytes:
    if n < 128:
        return _SMALL[n]
    return bytes((n & 0x7F | 0x80, n >> 7)) if n < 0x4000 else _varint(n)


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _len(len(payload)) + payload


class _Heads(dict[int, bytes]):
    """A string attribute's field up to its value's bytes, by the value's length: built
    once for the usual lengths, so a span's value costs one lookup."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        super().__init__((n, self[n]) for n in range(128))

    def __missing__(self, n: int) -> bytes:
        # KeyValue{key, value: AnyValue{string_value}} as an attribute field (Span.attributes).
        any_value = _STRING_VALUE + _len(n)
        value_size = len(any_value) + n
        key_value = self.key + _len(value_size) + any_value
        return _ATTRIBUTE + _len(len(key_value) + n) + key_value


class EncodedShape(NamedTuple):
    constant: bytes  # name, kind and constant attributes, as Span fields
    heads: tuple[_Heads, ...]  # one per string attribute


def encode_shape(
    name: str, kind: int, attributes: Mapping[str, AttributeValue], keys: Sequence[str]
) -> EncodedShape:
    span = Span(name=name, kind=kind, attributes=_key_values(attributes))  # type: ignore[arg-type]
    constant: bytes = span.SerializeToString()
    heads = tuple(_Heads(_field(_KV_KEY, key.encode()) + _KV_VALUE) for key in keys)
    return EncodedShape(constant, heads)


def encode_span(span: SpanData) -> bytes:
    """The span as a field of ScopeSpans."""
    shape = span.shape.encoded
    parent_id = span.parent_id
    # The ids with their tags, as hex, made bytes in one call.
    if parent_id is None:
        ids = bytes.fromhex(f"{_TRACE_ID_HEX}{span.trace_id}{_SPAN_ID_HEX}{span.span_id}")
        flags = _FLAGS_LOCAL
    else:
        ids = bytes.fromhex(
            f"{_TRACE_ID_HEX}{span.trace_id}{_SPAN_ID_HEX}{span.span_id}{_PARENT_ID_HEX}{parent_id}"
        )
        flags = _FLAGS_REMOTE if span.remote_parent else _FLAGS_LOCAL
    parts = [shape.constant, ids, flags, _TIMES.pack(_START, span.start_ns, _END, span.end_ns)]
    for heads, value in zip(shape.heads, span.values, strict=True):
        data = value.encode()
        parts += (heads[len(data)], data)
    if span.trace_state:
        parts.append(_field(_TRACE_STATE, span.trace_state.encode()))
    if span.attributes or span.events or span.status:
        parts.append(_rare(span))
    body = b"".join(parts)
    return _SPANS + _len(len(body)) + body


def _rare(span: SpanData) -> bytes:
    """Extra attributes, events and status: rare enough for the generated classes."""
    message = Span(attributes=_key_values(span.attributes or {}))
    for name, time_ns, attributes in span.events or ():
        message.events.add(time_unix_nano=time_ns, name=name, attributes=_key_values(attributes))
    if span.status is not None:
        code, description = span.status
        message.status.CopyFrom(Status(code=code, message=description))  # type: ignore[arg-type]
    out: bytes = message.SerializeToString()
    return out


class Encoder:
    """ExportTraceServiceRequest bytes for spans of one resource and instrumentation scope."""

    def __init__(
        self, resource: Mapping[str, AttributeValue], scope: str, version: str,
        schema_url: str = "",
    ) -> None:  # fmt: skip
        self._resource = ResourceSpans(
            resource=Resource(attributes=_key_values(resource)), schema_url=schema_url
        ).SerializeToString()
        self._scope = ScopeSpans(
            scope=InstrumentationScope(name=scope, version=version)
        ).SerializeToString()

    def encode(self, spans: Iterable[SpanData]) -> bytes:
        return self.request(map(encode_span, spans))

    def request(self, encoded: Iterable[bytes]) -> bytes:
        """The request around spans `encode_span` encoded."""
        scope_spans = self._scope + b"".join(encoded)
        return _field(_RESOURCE_SPANS, self._resource + _field(_SCOPE_SPANS, scope_spans))


def _key_values(attributes: Mapping[str, AttributeValue]) -> list[KeyValue]:
    return [KeyValue(key=key, value=_any_value(value)) for key, value in attributes.items()]


def _any_value(value: object) -> AnyValue:
    if isinstance(value, bool):  # before int: a bool is an int
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, list | tuple):
        return AnyValue(array_value=ArrayValue(values=[_any_value(v) for v in value]))
    return AnyValue(string_value=str(value))
