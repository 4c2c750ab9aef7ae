"""The two wire formats: producers' flat UTF-8 fields, and the internal envelope.

Producers in any language `XADD <prefix>:tasks * prompt "…"`. Between stages an entry has
two fields: `_env`, holding a versioned msgpack `Envelope` with the task's fields, its
attempt count, its times and its trace context, and `_id`, the task id in plain text, so that
an entry whose envelope cannot be read (corrupt, too large, from a newer version during a
rolling upgrade) still fails under its task's own id. The ingress stream may hold both kinds
(a retried ingress entry comes back as an envelope), so decoding looks at the field names.
"""

from __future__ import annotations

import msgspec

from pipeline.runtime.errors import InvalidTask
from pipeline.runtime.traceparent import valid as valid_traceparent

WIRE_VERSION = 1
ENVELOPE_FIELD = b"_env"
ID_FIELD = b"_id"
_ENV_NAME, _ID_NAME = ENVELOPE_FIELD.decode(), ID_FIELD.decode()
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


def onward(
    env: Envelope,
    *,
    attempt: int,
    enqueued_ms: int,
    trace: tuple[str | None, str | None],
    origin_id: str,
    body: msgspec.Raw | None = None,
    fields: dict[str, str] | None = None,
) -> Envelope:
    """The envelope that carries a task on from `env` (to the next stage, or back onto its
    own stream later): the one place an envelope is rebuilt."""
    traceparent, tracestate = trace
    return msgspec.structs.replace(
        env,
        attempt=attempt,
        enqueued_ms=enqueued_ms,
        traceparent=traceparent,
        tracestate=tracestate,
        origin_id=origin_id,
        body=env.body if body is None else body,
        fields=env.fields if fields is None else fields,
    )


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)


def encode_envelope(env: Envelope) -> bytes:
    return _encoder.encode(env)


def decode_envelope(packed: bytes) -> Envelope:
    """Raises msgspec.DecodeError/ValidationError on anything that is not an envelope."""
    return _decoder.decode(packed)


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
    # An entry between stages is its envelope (and a short id); a producer's, every field.
    if packed is not None and (len(raw) == 1 or (len(raw) == 2 and ID_FIELD in raw)):
        size = len(packed) + len(raw.get(ID_FIELD, b""))
    else:
        size = entry_bytes(raw)
    if size > max_entry_bytes:
        raise InvalidTask(f"entry is {size:,} bytes, over the {max_entry_bytes:,}-byte limit")
    if packed is not None:
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
        raise InvalidTask(
            f"id: {len(task_id):,} characters, over the {MAX_TASK_ID_CHARS}-character limit"
        )
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


def entry_bytes(raw: dict[bytes, bytes]) -> int:
    """An entry's size as the limits count it: its names and values."""
    return sum(map(len, raw)) + sum(map(len, raw.values()))


def task_id_of(entry_id: str, raw: dict[bytes, bytes]) -> str:
    """The task id of an entry that could not be decoded, read without decoding it: an
    internal entry's `_id`, a producer's `id` (whole, however long), else the entry id."""
    name = ID_FIELD if ENVELOPE_FIELD in raw else b"id"
    value = raw.get(name, b"")
    return value.decode(errors="backslashreplace") if value else entry_id


def internal_entry(env: Envelope) -> dict[str, str | bytes]:
    """The fields of an entry between stages."""
    return internal_fields(_encoder.encode(env), env.task_id)


def internal_fields(packed: bytes, task_id: str) -> dict[str, str | bytes]:
    """An entry between stages from its packed envelope (names and the id as text: only
    the envelope is binary, which keeps a hand-off's arguments few, `pipeline.runtime.handoff`)."""
    return {_ENV_NAME: packed, _ID_NAME: task_id}


def delayed_member(env: Envelope) -> bytes:
    """An entry waiting in a delayed-retry set: `<n>:<task id><envelope>` (`promote.lua`
    turns it back into `internal_entry`'s two fields)."""
    task_id = env.task_id.encode()
    return b"%d:%s%s" % (len(task_id), task_id, _encoder.encode(env))


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
