"""The dead-letter stream: what failed, where, why, and everything needed to replay it.

A letter keeps the entry that failed whole (`entry`: its field names and values, byte for
byte, msgpack), and replay sends exactly that back to the stream it came from: a producer's
task goes back to the ingress as the producer wrote it, a task that failed at a later stage
goes back to that stage with its parsed request and a fresh attempt count. What a letter
*shows* (`fields`, `error`) is cut for reading; what it *keeps* is not. The DLQ is bounded by
letters and by bytes (`dlq.maxlen`, `dlq.max_bytes`): the oldest letters go first, and a
letter going never touches its task's `failed` result, written when the letter was.

With partitions each partition has its DLQ (in the slot of the hand-offs that write it),
and a letter's id is its partition and its entry id there, `p3/1718000000000-0` (entry ids
are unique in one stream only); a bare entry id is looked for in every partition, and taken
if only one has it. `DeadLetters` reads them merged, newest first; a replay puts the task back
into its own partition in one step, then deletes the result producers read (a copy of the
partition's, which that step deleted).
"""

from __future__ import annotations

import builtins
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec
from redis.asyncio import Redis
from redis.typing import EncodableT

from pipeline.runtime.errors import PipelineError
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
    partition: int | None = None  # whose DLQ holds it (None: no partitions)

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
    def parse(
        cls, dlq_id: bytes | str, raw: Mapping[bytes, bytes], partition: int | None = None
    ) -> DeadLetter:
        """A letter from its DLQ entry; `partition`: that of the DLQ it was read from (its
        `dlq_id` then names it, `p3/<entry id>`)."""
        entry_id = dlq_id.decode() if isinstance(dlq_id, bytes) else dlq_id
        get = {k.decode(): v.decode(errors="replace") for k, v in raw.items() if k != b"entry"}
        try:
            fields = json.loads(get.get("fields", "{}"))
        except ValueError:
            fields = {}
        return cls(
            dlq_id=letter_id(partition, entry_id),
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
            partition=partition,
        )


#: A DLQ id: an entry id (`1718000000000-0`, or just its milliseconds), after `p<N>/` for a
#: partition's DLQ.
DLQ_ID = re.compile(r"(?:p(\d+)/)?(\d+(?:-\d+)?)")


def letter_id(partition: int | None, entry_id: str) -> str:
    """A letter's id: its DLQ entry id, after its partition's `p<N>/` if it has one."""
    return entry_id if partition is None else f"p{partition}/{entry_id}"


class DlqIdError(PipelineError):
    """A DLQ id that names no one letter here: not an id, a partition the deployment does
    not have, or a bare entry id found in more than one partition's DLQ."""


def _order(letter: DeadLetter) -> tuple[int, int, int]:
    """Letters in the order they were written (entry ids), across partitions."""
    ms, _, seq = letter.dlq_id.rpartition("/")[2].partition("-")
    return int(ms), int(seq or 0), letter.partition or 0


class DeadLetters:
    """List, inspect, replay and purge the DLQ (the CLI's `pipeline dlq …`): with partitions,
    every partition's."""

    def __init__(self, redis: Redis, keys: Keys, live_ttl_s: int = 7 * 24 * 3600) -> None:
        """`keys`: the deployment's (`open_deployment`), partitioned or not."""
        self._redis = redis
        self._keys = keys
        self._parts = keys.each_partition()
        self._live_ttl_s = live_ttl_s  # `results.live_ttl_s`: a replayed task is live again
        self._take = load(redis, "dlq_take")

    async def size(self) -> int:
        if len(self._parts) == 1:
            return int(await self._redis.xlen(self._parts[0].dlq))
        async with self._redis.pipeline(transaction=False) as pipe:
            for part in self._parts:
                pipe.xlen(part.dlq)
            return sum(int(n) for n in await pipe.execute())

    async def list(self, count: int = 20, newest_first: bool = True) -> list[DeadLetter]:
        """The newest (or oldest) `count` letters; with partitions, of all partitions merged
        by entry id (ids of partitions on different nodes come from different clocks: the
        order across partitions is as good as those clocks)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for part in self._parts:
                if newest_first:
                    pipe.xrevrange(part.dlq, count=count)
                else:
                    pipe.xrange(part.dlq, count=count)
            replies = await pipe.execute()
        letters = [
            DeadLetter.parse(i, f, part.partition)
            for part, reply in zip(self._parts, replies, strict=True)
            for i, f in range_entries(reply)
        ]
        letters.sort(key=_order, reverse=newest_first)
        return letters[:count]

    async def get(self, dlq_id: str) -> DeadLetter | None:
        """The letter `dlq_id` names (None if there is none). Raises `DlqIdError` for an id
        that cannot name one letter (a bare entry id in several partitions' DLQs)."""
        found = await self.find(dlq_id)
        if len(found) > 1:
            ids = ", ".join(letter.dlq_id for letter in found)
            raise DlqIdError(f"{dlq_id} is in {len(found)} partitions' DLQs: give one of {ids}")
        return found[0] if found else None

    async def find(self, dlq_id: str) -> builtins.list[DeadLetter]:
        """Every letter `dlq_id` may name: one partition's (`p3/<id>`, or no partitions),
        or, for a bare entry id with partitions, each partition's that has it."""
        partition, entry_id = self._parse(dlq_id)
        parts = self._parts if partition is None else [self._keys.of_partition(partition)]
        async with self._redis.pipeline(transaction=False) as pipe:
            for part in parts:
                pipe.xrange(part.dlq, entry_id, entry_id)
            replies = await pipe.execute()
        return [
            DeadLetter.parse(i, f, part.partition)
            for part, reply in zip(parts, replies, strict=True)
            for i, f in range_entries(reply)[:1]
        ]

    async def of_task(self, task_id: str, page: int = 500) -> tuple[DeadLetter | None, int]:
        """The newest letter of the task `task_id`, and how many it has. Task ids have no
        index: its (partition's) DLQ, bounded, is read in pages, newest first."""
        dlq = self._keys.for_task(task_id).dlq
        partition = self._keys.partition_of(task_id)
        newest: DeadLetter | None = None
        found, before = 0, "+"
        while True:
            rows = range_entries(await self._redis.xrevrange(dlq, max=before, count=page))
            for entry_id, fields in rows:
                if fields.get(b"task_id", b"").decode(errors="replace") == task_id:
                    newest = newest or DeadLetter.parse(entry_id, fields, partition)
                    found += 1
            if len(rows) < page:
                return newest, found
            before = f"({rows[-1][0].decode()}"

    def _parse(self, dlq_id: str) -> tuple[int | None, str]:
        """(partition or None, entry id) of a DLQ id; `DlqIdError` if it cannot be one here."""
        match = DLQ_ID.fullmatch(dlq_id)
        if match is None:
            raise DlqIdError(f"{dlq_id!r} is not a DLQ id (like 1718000000000-0)")
        partition = None if match[1] is None else int(match[1])
        if partition is not None and not self._keys.partitions:
            raise DlqIdError(f"{dlq_id}: this deployment has no partitions (give {match[2]})")
        if partition is not None and partition >= self._keys.partitions:
            raise DlqIdError(
                f"{dlq_id}: no partition {partition} (the deployment has "
                f"{self._keys.partitions}: p0-p{self._keys.partitions - 1})"
            )
        if partition is None and self._keys.partitions == 1:
            partition = 0
        return partition, match[2]

    # `builtins.list` below: inside this class, `list` is the method above.
    async def replay(self, dlq_ids: builtins.list[str]) -> builtins.list[str]:
        """Send each letter's entry back, whole, to the stream it failed on, fresh attempts.

        In the same step (`dlq_take.lua`) the letter leaves the DLQ and the task's id is
        freed for the replayed entry: its `failed` result goes (results are first-writer-
        wins), and its record forgets who held the id but keeps any answer already paid
        for, so a replay never pays for that call again. A letter refused because its id
        belonged to another task leaves that task alone: its replay is judged afresh.

        With partitions the step lies in the letter's partition (its DLQ, the stream the
        entry failed on, the task's record and the partition's copy of its result); the
        result producers read is deleted right after it (a publisher mirrors the copy only
        while it exists, so the `failed` one does not come back). Every id is looked up
        before any is replayed: `DlqIdError` for one that names no one letter.
        """
        letters = [(dlq_id, await self.get(dlq_id)) for dlq_id in dlq_ids]
        replayed: builtins.list[str] = []
        for dlq_id, letter in letters:
            if letter is not None and await self._replay(letter):
                replayed.append(dlq_id)
        return replayed

    async def _replay(self, letter: DeadLetter) -> bool:
        part = self._keys if letter.partition is None else self._keys.of_partition(letter.partition)
        stream, entry = self._replayed_entry(letter)
        task = letter.task_id
        # With partitions, an entry that cannot go back into its partition (an old letter
        # without one) goes in through the ingress, after the step (not atomic with it).
        through_ingress = bool(self._keys.partitions) and stream == self._keys.ingress
        keys = [part.dlq, part.dlq_bytes, part.dlq if through_ingress else stream,
                part.landing(task), part.task(task)]  # fmt: skip
        args: builtins.list[EncodableT] = [
            letter.dlq_id.rpartition("/")[2], "replay", "0" if letter.result_kept else "1",
            letter.owner, self._live_ttl_s,
        ]  # fmt: skip
        if not through_ingress:
            args += [p for pair in entry.items() for p in pair]
        taken = int(await self._take(keys=keys, args=args))
        if taken and through_ingress:
            await self._redis.xadd(stream, entry)  # type: ignore[arg-type]
        if taken == 2 and self._keys.partitions:  # the id was freed: its published result too
            await self._redis.delete(self._keys.result(task))
        return bool(taken)

    def _replayed_entry(
        self, letter: DeadLetter
    ) -> tuple[str, dict[bytes, bytes] | dict[str, str | bytes]]:
        """Where a letter goes back and what: its entry as it was (an envelope with its
        attempts counted afresh); an old letter without one, its fields via the ingress."""
        now = int(time.time() * 1000)
        original = letter.entry_fields()
        if original is not None and self._home(letter, letter.stream):
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

    def _home(self, letter: DeadLetter, stream: str) -> bool:
        """Whether `stream` is one of this prefix's streams a replay may add to in one step
        with the letter: with partitions, one of the letter's partition."""
        if letter.partition is None:
            return stream.startswith(f"{self._keys.prefix}:")
        return self._keys.of_partition(letter.partition).owns(stream)

    async def purge(self, dlq_ids: builtins.list[str] | None = None) -> int:
        """Delete the given entries, or the whole DLQ (every partition's) when `dlq_ids` is
        None. Every id is looked up first: `DlqIdError` for one that names no one letter."""
        if dlq_ids is None:
            n = await self.size()
            async with self._redis.pipeline(transaction=False) as pipe:
                for part in self._parts:
                    pipe.delete(part.dlq, part.dlq_bytes)  # one slot: one command each
                await pipe.execute()
            return n
        found: builtins.list[tuple[Keys, str]] = []
        for dlq_id in dlq_ids:
            partition, entry_id = self._parse(dlq_id)
            if partition is None and self._keys.partitions:
                letter = await self.get(dlq_id)  # looked for in every partition
                if letter is None:
                    continue
                partition = letter.partition
            part = self._keys if partition is None else self._keys.of_partition(partition)
            found.append((part, entry_id))
        gone = 0
        for part, entry_id in found:
            gone += int(await self._take(keys=[part.dlq, part.dlq_bytes], args=[entry_id, "purge"]))
        return gone


__all__ = ["DLQ_ID", "DeadLetter", "DeadLetters", "DlqIdError", "dlq_fields", "letter_id"]
