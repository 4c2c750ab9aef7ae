"""Turning outcomes into the records of `handoff.lua`, and packing a batch into one argument.

Outcomes of one stage are group-committed: while one batch is in flight to Redis, the next
ones collect, so a busy stage sends one script call per batch rather than one per entry. The
batch travels as a single msgpack argument: packed in C by msgspec, unpacked in C by Redis's
cmsgpack, instead of thousands of protocol arguments packed in Python.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

_encode = msgspec.msgpack.Encoder().encode


def _flat(
    fields: Mapping[str, str] | Mapping[bytes, bytes] | Mapping[str, str | bytes],
) -> list[object]:
    out: list[object] = []
    for k, v in fields.items():
        out += (k, v if isinstance(v, bytes) else str(v))
    return out


@dataclass(slots=True)
class Record:
    """The actions for one entry; keys are kept as names and indexed when the batch is built."""

    entry_id: str
    expected_deliveries: int  # 0 = no fence check needed
    actions: list[list[object]] = field(default_factory=list)

    def xadd(
        self, key: str,
        fields: Mapping[str, str] | Mapping[bytes, bytes] | Mapping[str, str | bytes],
        maxlen: int = 0,
    ) -> None:  # fmt: skip
        self.actions.append(["XADD", key, maxlen, _flat(fields)])

    def zadd(self, key: str, delay_ms: int, member: bytes) -> None:
        self.actions.append(["ZADD", key, delay_ms, member])

    def result(
        self, key: str, ttl_s: int, fields: Mapping[str, str],
        done_key: str, done_maxlen: int, event: Mapping[str, str], record_key: str,
        owner: str = "",
    ) -> None:  # fmt: skip
        """Store the result (first writer wins) and its done event; the task's record
        (`pipeline.claude.task_record`) then expires with the result. `owner`: the ingress entry
        the task came in by ("" if unknown); a stray copy of an id another entry owns writes
        no result under it."""
        self.actions.append(["RESULT", key, ttl_s, _flat(fields), done_key, done_maxlen,
                             _flat(event), record_key, owner])  # fmt: skip

    def letter(
        self, dlq_key: str, bytes_key: str, maxlen: int, max_bytes: int,
        fields: Mapping[str, str | bytes],
    ) -> None:  # fmt: skip
        """Add a dead letter; the oldest letters go while the DLQ holds more than `maxlen`
        letters or `max_bytes` bytes (each letter's `size` field says what it holds)."""
        self.actions.append(["LETTER", dlq_key, bytes_key, maxlen, max_bytes,
                             int(fields["size"]), _flat(fields)])  # fmt: skip


_KEY_SLOTS = {"XADD": (1,), "ZADD": (1,), "RESULT": (1, 4, 7), "LETTER": (1, 2)}
_FIELD_SLOTS = {"XADD": (3,), "RESULT": (3, 6), "LETTER": (6,)}


_ARGV_FIRST_BLOB = 5  # ARGV[1..3] group, consumer, xackdel flag; ARGV[4] the records


def build_call(stream: str, records: list[Record]) -> tuple[list[str], list[bytes]]:
    """KEYS, and ARGV[4..] (packed records, then the binary values they refer to)."""
    keys = [stream]
    index: dict[str, int] = {stream: 1}
    blobs: list[bytes] = []

    def blob_ref(value: object) -> object:
        if isinstance(value, bytes):
            blobs.append(value)
            return _ARGV_FIRST_BLOB + len(blobs) - 1
        return value

    packed = []
    for rec in records:
        actions = []
        for action in rec.actions:
            action = list(action)
            for slot in _KEY_SLOTS[action[0]]:  # type: ignore[index]
                key = action[slot]
                ix = index.get(key)  # type: ignore[call-overload]
                if ix is None:
                    keys.append(key)  # type: ignore[arg-type]
                    ix = index[key] = len(keys)  # type: ignore[index]
                action[slot] = ix
            kind = action[0]
            if kind == "ZADD":
                action[3] = blob_ref(action[3])
            else:
                for slot in _FIELD_SLOTS[kind]:  # type: ignore[index]
                    action[slot] = [blob_ref(v) for v in action[slot]]  # type: ignore[attr-defined]
            actions.append(action)
        packed.append((rec.entry_id, rec.expected_deliveries, actions))
    return keys, [_encode(packed), *blobs]
