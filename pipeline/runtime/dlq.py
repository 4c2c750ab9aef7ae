"""The dead-letter stream: what failed, where, why, and everything needed to replay it.

A letter keeps the entry that failed whole (`entry`: its field names and values, byte for
byte, msgpack), and replay sends exactly that back to the stream it came from: a producer's
task goes back to the ingress as the producer wrote it, a task that failed at a later stage
goes back to that stage with its parsed request and a fresh attempt count. What a letter
*shows* (`fields`, `error`) is cut for reading; what it *keeps* is not. The DLQ is bounded by
letters and by bytes (`dlq.maxlen`, `dlq.max_bytes`): the oldest letters go first, and a
letter going never touches its task's `failed` result, written when the letter was.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec
from redis.asyncio import Redis
from redis.typing import EncodableT

from pipeline.runtime.keys import Keys
from pipeline.runtime.replies import range_entries
from pipeline.runtime.scripts import load
from pipeline.runtime.wire import (
    ENVELOPE_FIELD,
    WIRE_VERSION,
    Envelope,
    decode_envelope,
    encode_envelope,
    internal_entry,
)

_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder(list[bytes]).decode


def raw_entry(raw: Mapping[bytes, bytes] | Mapping[str, str | bytes]) -> bytes:
    """A stream entry's fields, packed for a letter exactly as they were (as bytes)."""
    return _pack([p if isinstance(p, bytes) else p.encode() for pair in raw.items() for p in pair])


def entry_of(env: Envelope) -> bytes:
    """The entry a decoded task came in, packed for a letter: the producer's own fields while
    no stage has handed the task on (it replays through the ingress as the producer wrote
    it), else the stage's entry (it replays at that stage)."""
    if bytes(env.body) == b"\xc0":
        return raw_entry({k.encode(): v.encode() for k, v in env.fields.items()})
    return raw_entry(internal_entry(env))


def dlq_fields(
    *,
    task_id: str,
    stage: str,
    stream: str,
    entry_id: str,
    error: str,
    deliveries: int,
    attempts: int,
    fields: Mapping[str, str],
    traceparent: str | None,
    tracestate: str | None,
    max_field_bytes: int,
    entry: bytes = b"",
    owner: str = "",
    result_kept: bool = False,
) -> dict[str, str | bytes]:
    """One DLQ entry: where and why it failed, the task's fields to read (cut), and the
    entry itself (`entry`, whole, for replay).

    `owner`: the ingress entry the task came in by ("" if unknown); a replay frees the
    task's id only if no other entry owns it. `result_kept`: the entry was refused because
    its id belongs to another task, whose result (if any) is not this letter's: a replay
    must leave it alone.
    """
    original = {k: _cut(v, max_field_bytes) for k, v in fields.items()}
    letter: dict[str, str | bytes] = {
        "task_id": task_id,
        "stage": stage,
        "stream": stream,
        "entry_id": entry_id,
        "error": _cut(error, 4096),
        "deliveries": str(deliveries),
        "attempts": str(attempts),
        "failed_at_ms": str(int(time.time() * 1000)),
        "traceparent": traceparent or "",
        "tracestate": tracestate or "",
        "fields": json.dumps(original, ensure_ascii=False),
    }
    if owner:
        letter["owner"] = owner
    if result_kept:
        letter["result_kept"] = "1"
    letter["entry"] = entry
    shown = sum(len(k) + len(v) for k, v in letter.items())
    letter["size"] = str(shown + 16)
    return letter


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[cut: {len(text)} chars in all]"


@dataclass(frozen=True)
class DeadLetter:
    """A DLQ entry as read back."""

    dlq_id: str
    task_id: str
    stage: str
    stream: str
    error: str
    deliveries: int
    attempts: int
    failed_at_ms: int
    traceparent: str
    fields: dict[str, str]
    result_kept: bool = False  # refused for an id in use: the result there is not ours
    owner: str = ""  # the ingress entry the task came in by ("" if unknown or old)
    entry: bytes = b""  # the entry that failed, whole (see `raw_entry`); b"" in old letters
    size: int = 0

    def entry_fields(self) -> dict[bytes, bytes] | None:
        """The entry that failed, field by field as it was (None if the letter is too old
        to hold it, or it cannot be read)."""
        try:
            parts = _unpack(self.entry) if self.entry else None
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        if parts is None or len(parts) % 2:
            return None
        return dict(zip(parts[::2], parts[1::2], strict=True))

    @classmethod
    def parse(cls, dlq_id: bytes | str, raw: Mapping[bytes, bytes]) -> DeadLetter:
        get = {k.decode(): v.decode(errors="replace") for k, v in raw.items() if k != b"entry"}
        try:
            fields = json.loads(get.get("fields", "{}"))
        except ValueError:
            fields = {}
        return cls(
            dlq_id=dlq_id.decode() if isinstance(dlq_id, bytes) else dlq_id,
            task_id=get.get("task_id", ""),
            stage=get.get("stage", ""),
            stream=get.get("stream", ""),
            error=get.get("error", ""),
            deliveries=int(get.get("deliveries", "0") or 0),
            attempts=int(get.get("attempts", "0") or 0),
            failed_at_ms=int(get.get("failed_at_ms", "0") or 0),
            traceparent=get.get("traceparent", ""),
            fields=fields if isinstance(fields, dict) else {},
            result_kept=get.get("result_kept") == "1",
            owner=get.get("owner", ""),
            entry=raw.get(b"entry", b""),
            size=int(get.get("size", "0") or 0),
        )


class DeadLetters:
    """List, inspect, replay and purge the DLQ (the CLI's `pipeline dlq …`)."""

    def __init__(self, redis: Redis, keys: Keys, live_ttl_s: int = 7 * 24 * 3600) -> None:
        self._redis = redis
        self._keys = keys
        self._live_ttl_s = live_ttl_s  # `results.live_ttl_s`: a replayed task is live again
        self._take = load(redis, "dlq_take")

    async def size(self) -> int:
        return int(await self._redis.xlen(self._keys.dlq))

    async def list(self, count: int = 20, newest_first: bool = True) -> list[DeadLetter]:
        read = self._redis.xrevrange if newest_first else self._redis.xrange
        rows = range_entries(await read(self._keys.dlq, count=count))
        return [DeadLetter.parse(i, f) for i, f in rows]

    async def get(self, dlq_id: str) -> DeadLetter | None:
        rows = range_entries(await self._redis.xrange(self._keys.dlq, dlq_id, dlq_id))
        return DeadLetter.parse(*rows[0]) if rows else None

    # `builtins.list` below: inside this class, `list` is the method above.
    async def replay(self, dlq_ids: builtins.list[str]) -> builtins.list[str]:
        """Send each letter's entry back, whole, to the stream it failed on, fresh attempts.

        In the same step (`dlq_take.lua`) the letter leaves the DLQ and the task's id is
        freed for the replayed entry: its `failed` result goes (results are first-writer-
        wins), and its record forgets who held the id but keeps any answer already paid
        for, so a replay never pays for that call again. A letter refused because its id
        belonged to another task leaves that task alone: its replay is judged afresh.
        """
        replayed: builtins.list[str] = []
        for dlq_id in dlq_ids:
            letter = await self.get(dlq_id)
            if letter is None:
                continue
            stream, entry = self._replayed_entry(letter)
            task = letter.task_id
            keys = [self._keys.dlq, self._keys.dlq_bytes, stream,
                    self._keys.result(task), self._keys.task(task)]  # fmt: skip
            args: builtins.list[EncodableT] = [
                dlq_id, "replay", "0" if letter.result_kept else "1", letter.owner,
                self._live_ttl_s, *(p for pair in entry.items() for p in pair),
            ]  # fmt: skip
            if await self._take(keys=keys, args=args):
                replayed.append(dlq_id)
        return replayed

    def _replayed_entry(
        self, letter: DeadLetter
    ) -> tuple[str, dict[bytes, bytes] | dict[str, str | bytes]]:
        """Where a letter goes back and what: its entry as it was (an envelope with its
        attempts counted afresh); an old letter without one, its fields via the ingress."""
        now = int(time.time() * 1000)
        original = letter.entry_fields()
        if original is not None and letter.stream.startswith(f"{self._keys.prefix}:"):
            packed = original.get(ENVELOPE_FIELD)
            if packed is None:  # a producer's entry: its task id goes with it
                original.setdefault(b"id", letter.task_id.encode())
                return letter.stream, original
            try:
                env = decode_envelope(packed)
            except (msgspec.DecodeError, msgspec.ValidationError):
                return letter.stream, original  # fails again as it did: exactly that
            fresh = msgspec.structs.replace(env, attempt=1, enqueued_ms=now)
            return letter.stream, internal_entry(fresh)
        fields = dict(letter.fields)
        fields.setdefault("id", letter.task_id)
        env = Envelope(
            v=WIRE_VERSION,
            task_id=letter.task_id,
            fields=fields,
            attempt=1,
            origin_ms=now,
            enqueued_ms=now,
            traceparent=letter.traceparent or None,
        )
        return self._keys.ingress, {ENVELOPE_FIELD: encode_envelope(env)}

    async def purge(self, dlq_ids: builtins.list[str] | None = None) -> int:
        """Delete the given entries, or the whole DLQ when `dlq_ids` is None."""
        if dlq_ids is None:
            n = await self.size()
            await self._redis.delete(self._keys.dlq, self._keys.dlq_bytes)
            return n
        keys = [self._keys.dlq, self._keys.dlq_bytes]
        gone = 0
        for dlq_id in dlq_ids:
            gone += int(await self._take(keys=keys, args=[dlq_id, "purge"]))
        return gone


__all__ = ["DeadLetter", "DeadLetters", "dlq_fields"]
