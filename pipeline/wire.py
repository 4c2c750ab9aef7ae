"""The two wire formats: producers' flat UTF-8 fields, and the internal envelope.

Producers in any language `XADD <prefix>:tasks * prompt "…"`. Between stages an entry has
a single field, `_env`, holding a versioned msgpack `Envelope` with the task's original
fields, its attempt count, its times and its trace context. The ingress stream may hold
both kinds (a retried ingress entry comes back as an envelope), so decoding looks at the
field names.
"""

from __future__ import annotations

import msgspec

from pipeline.errors import InvalidTask
from pipeline.tracer import valid_traceparent

WIRE_VERSION = 1
ENVELOPE_FIELD = b"_env"
MAX_TASK_ID_CHARS = 256
_NIL = msgspec.Raw(b"\xc0")


class Envelope(msgspec.Struct, array_like=True, frozen=True):
    """One task as it travels between stages."""

    v: int
    task_id: str
    fields: dict[str, str]
    attempt: int
    origin_ms: int
    enqueued_ms: int
    traceparent: str | None = None
    tracestate: str | None = None
    body: msgspec.Raw = _NIL
    #: The ingress entry the task came in by ("" until a stage has handed it on): the one
    #: entry that owns a producer's id, whatever retries re-enqueue (`Message.origin_id`).
    origin_id: str = ""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)


def encode_envelope(env: Envelope) -> bytes:
    return _encoder.encode(env)


def encode_body(body: object) -> msgspec.Raw:
    return msgspec.Raw(_encoder.encode(body))


_body_decoders: dict[type[object], msgspec.msgpack.Decoder[object]] = {}


def decode_body(raw: msgspec.Raw, kind: type[object]) -> object:
    decoder = _body_decoders.get(kind)
    if decoder is None:
        decoder = _body_decoders[kind] = msgspec.msgpack.Decoder(kind)
    return decoder.decode(raw)


def entry_ms(entry_id: str) -> int:
    """The millisecond part of a stream entry id (when it was added)."""
    return int(entry_id.partition("-")[0])


def decode_entry(entry_id: str, raw: dict[bytes, bytes], max_entry_bytes: int) -> Envelope:
    """Turn a stream entry (either format) into an Envelope.

    Raises:
        InvalidTask: undecodable, oversized, not UTF-8, or an unusable task id.
    """
    packed = raw.get(ENVELOPE_FIELD)
    if packed is not None and len(raw) == 1:
        size = len(packed)
    else:
        size = sum(len(k) + len(v) for k, v in raw.items())
    if size > max_entry_bytes:
        raise InvalidTask(f"entry is {size} bytes, over the {max_entry_bytes}-byte limit")
    if packed is not None and len(raw) == 1:
        try:
            env = _decoder.decode(packed)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise InvalidTask(f"undecodable envelope: {exc}") from None
        if env.v != WIRE_VERSION:
            raise InvalidTask(
                f"unsupported wire version {env.v} (this worker speaks {WIRE_VERSION})"
            )
        return env
    fields: dict[str, str] = {}
    for key, value in raw.items():
        try:
            fields[key.decode()] = value.decode()
        except UnicodeDecodeError:
            name = key.decode(errors="replace")
            raise InvalidTask(f"field {name!r} is not valid UTF-8") from None
    task_id = fields.get("id") or entry_id
    if len(task_id) > MAX_TASK_ID_CHARS:
        raise InvalidTask(f"task id is longer than {MAX_TASK_ID_CHARS} characters")
    ms = entry_ms(entry_id)
    traceparent = fields.get("traceparent")
    if not valid_traceparent(traceparent):  # W3C: ignore it (and its tracestate); start anew
        traceparent = None
    return Envelope(
        v=WIRE_VERSION,
        task_id=task_id,
        fields=fields,
        attempt=1,
        origin_ms=ms,
        enqueued_ms=ms,
        traceparent=traceparent,
        tracestate=fields.get("tracestate") if traceparent else None,
    )


def raw_fields_text(raw: dict[bytes, bytes], max_field_bytes: int) -> dict[str, str]:
    """Best-effort readable copy of an entry's fields for the DLQ (cut, never failing)."""
    out: dict[str, str] = {}
    for key, value in raw.items():
        cut = value[:max_field_bytes]
        text = cut.decode(errors="backslashreplace")
        if len(value) > max_field_bytes:
            text += f"…[cut: {len(value)} bytes in all]"
        out[key.decode(errors="backslashreplace")] = text
    return out
