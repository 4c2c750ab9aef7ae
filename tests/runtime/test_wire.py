"""Wire formats: producers' flat fields and the internal versioned envelope."""

from __future__ import annotations

import msgspec
import pytest

from pipeline.runtime.errors import InvalidTask
from pipeline.runtime.wire import (
    ENVELOPE_FIELD,
    MAX_TASK_ID_CHARS,
    WIRE_VERSION,
    Envelope,
    decode_body,
    decode_entry,
    encode_body,
    encode_envelope,
    entry_ms,
    raw_fields_text,
)

EID = "1700000000123-4"
LIMIT = 1 << 20
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def envelope(**changes: object) -> Envelope:
    values: dict[str, object] = {
        "v": WIRE_VERSION,
        "task_id": "t-1",
        "fields": {"prompt": "hi", "type": "summarise"},
        "attempt": 3,
        "origin_ms": 1_700_000_000_000,
        "enqueued_ms": 1_700_000_005_000,
        "traceparent": TRACEPARENT,
        "tracestate": "vendor=1",
    }
    values.update(changes)
    return Envelope(**values)  # type: ignore[arg-type]


def test_entry_ms() -> None:
    assert entry_ms(EID) == 1_700_000_000_123
    assert entry_ms("5-0") == 5


def test_ingress_fields_become_an_envelope() -> None:
    env = decode_entry(EID, {b"prompt": b"Summarise \xe2\x80\xa6", b"type": b"summarise"}, LIMIT)
    assert env.v == WIRE_VERSION
    assert env.task_id == EID  # no `id` field: the entry id is the task id
    assert env.fields == {"prompt": "Summarise \u2026", "type": "summarise"}
    assert env.attempt == 1
    assert env.origin_ms == env.enqueued_ms == 1_700_000_000_123
    assert env.traceparent is None
    assert env.tracestate is None


def test_id_field_overrides_task_id() -> None:
    env = decode_entry(EID, {b"prompt": b"x", b"id": b"order-42"}, LIMIT)
    assert env.task_id == "order-42"
    assert env.fields["id"] == "order-42"


def test_empty_id_field_falls_back_to_entry_id() -> None:
    assert decode_entry(EID, {b"prompt": b"x", b"id": b""}, LIMIT).task_id == EID


def test_trace_context_picked_up() -> None:
    raw = {b"prompt": b"x", b"traceparent": TRACEPARENT.encode(), b"tracestate": b"a=1"}
    env = decode_entry(EID, raw, LIMIT)
    assert env.traceparent == TRACEPARENT
    assert env.tracestate == "a=1"


@pytest.mark.parametrize(
    "traceparent",
    [
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero parent id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff is invalid
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
    ],
)
def test_a_malformed_traceparent_is_ignored_with_its_tracestate(traceparent: str) -> None:
    """W3C: start a new trace. The stages after trust the envelope's, so ingress decides."""
    raw = {b"prompt": b"x", b"traceparent": traceparent.encode(), b"tracestate": b"a=1"}
    env = decode_entry(EID, raw, LIMIT)
    assert env.traceparent is None and env.tracestate is None
    assert env.fields["traceparent"] == traceparent  # the producer's fields stay as sent


def test_envelope_round_trip() -> None:
    original = envelope(body=encode_body({"answer": [1, 2, 3]}))
    decoded = decode_entry(EID, {ENVELOPE_FIELD: encode_envelope(original)}, LIMIT)
    assert decoded == original
    assert decoded.task_id == "t-1"  # the envelope's id, not the entry id
    assert decoded.attempt == 3
    assert decoded.origin_ms == 1_700_000_000_000
    assert decode_body(decoded.body, dict) == {"answer": [1, 2, 3]}


def test_envelope_round_trip_defaults() -> None:
    original = envelope(traceparent=None, tracestate=None)
    decoded = decode_entry(EID, {ENVELOPE_FIELD: encode_envelope(original)}, LIMIT)
    assert decoded == original
    assert decode_body(decoded.body, object) is None


@pytest.mark.parametrize(
    "packed",
    [b"not msgpack at all \xff", b"", msgspec.msgpack.encode([1, "x"]), b"\x93\x01\x02"],
)
def test_undecodable_envelope_is_invalid(packed: bytes) -> None:
    with pytest.raises(InvalidTask, match="undecodable"):
        decode_entry(EID, {ENVELOPE_FIELD: packed}, LIMIT)


def test_unsupported_version_is_invalid() -> None:
    packed = encode_envelope(envelope(v=WIRE_VERSION + 1))
    with pytest.raises(InvalidTask, match="version"):
        decode_entry(EID, {ENVELOPE_FIELD: packed}, LIMIT)


def test_oversize_entry_is_invalid() -> None:
    raw = {b"prompt": b"x" * 100}  # 6 + 100 bytes
    assert decode_entry(EID, raw, 106).fields["prompt"] == "x" * 100
    with pytest.raises(InvalidTask, match="105"):
        decode_entry(EID, raw, 105)


def test_oversize_envelope_is_invalid() -> None:
    packed = encode_envelope(envelope(fields={"prompt": "y" * 1000}))
    with pytest.raises(InvalidTask):
        decode_entry(EID, {ENVELOPE_FIELD: packed}, 500)


def test_a_producer_field_next_to_an_envelope_counts_towards_the_size() -> None:
    """Only `_env` and `_id` are measured the short way; any other field is counted too."""
    packed = encode_envelope(envelope())
    with pytest.raises(InvalidTask, match="over the 1,000-byte limit"):
        decode_entry(EID, {ENVELOPE_FIELD: packed, b"prompt": b"z" * 2000}, 1000)


@pytest.mark.parametrize(
    "raw",
    [{b"prompt": b"caf\xe9"}, {b"pr\xffompt": b"x"}, {b"prompt": b"ok", b"type": b"\xc3\x28"}],
)
def test_non_utf8_is_invalid(raw: dict[bytes, bytes]) -> None:
    with pytest.raises(InvalidTask, match="UTF-8"):
        decode_entry(EID, raw, LIMIT)


def test_over_long_task_id_is_invalid() -> None:
    ok = "i" * MAX_TASK_ID_CHARS
    assert decode_entry(EID, {b"id": ok.encode()}, LIMIT).task_id == ok
    with pytest.raises(InvalidTask, match="id: 257 characters, over the 256-character limit"):
        decode_entry(EID, {b"id": (ok + "i").encode()}, LIMIT)


def test_raw_fields_text_cuts_long_values() -> None:
    raw = {b"prompt": b"a" * 100, b"type": b"short", b"bad": b"\xff\xfe"}
    out = raw_fields_text(raw, 10)
    assert out["prompt"].startswith("a" * 10)
    assert "a" * 11 not in out["prompt"]
    assert "100 bytes" in out["prompt"]
    assert out["type"] == "short"
    assert out["bad"] == "\\xff\\xfe"  # readable, never failing
    assert raw_fields_text({b"k": b"a" * 10}, 10) == {"k": "a" * 10}
