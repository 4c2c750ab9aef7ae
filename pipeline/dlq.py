"""The dead-letter stream: what failed, where, why, and everything needed to replay it."""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

from redis.asyncio import Redis

from pipeline.keys import Keys
from pipeline.replies import range_entries
from pipeline.wire import ENVELOPE_FIELD, WIRE_VERSION, Envelope, encode_envelope


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
    result_kept: bool = False,
) -> dict[str, str]:
    """One DLQ entry: the original task fields (JSON) plus where and why it failed.

    `result_kept`: the entry was refused because its id belongs to another task, whose
    result (if any) is not this letter's: a replay must leave it alone.
    """
    original = {k: _cut(v, max_field_bytes) for k, v in fields.items()}
    letter = {
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
    if result_kept:
        letter["result_kept"] = "1"
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

    @classmethod
    def parse(cls, dlq_id: bytes | str, raw: Mapping[bytes, bytes]) -> DeadLetter:
        get = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
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
        )


class DeadLetters:
    """List, inspect, replay and purge the DLQ (the CLI's `pipeline dlq …`)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

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
        """Send entries back to the start of the pipeline (ingress), fresh attempts.

        The old `failed` result and the task's record (`pipeline.task_record`) are removed
        in the same transaction, so the replayed task is a new one and can store its new
        result (results are first-writer-wins). A letter refused because its id belonged to
        another task keeps that task's result and record: its replay is judged afresh.
        """
        replayed: builtins.list[str] = []
        for dlq_id in dlq_ids:
            letter = await self.get(dlq_id)
            if letter is None:
                continue
            now = int(time.time() * 1000)
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
            async with self._redis.pipeline(transaction=True) as tx:
                tx.xadd(self._keys.ingress, {ENVELOPE_FIELD: encode_envelope(env)})
                if not letter.result_kept:
                    tx.delete(self._keys.result(letter.task_id), self._keys.task(letter.task_id))
                tx.xdel(self._keys.dlq, dlq_id)
                await tx.execute()
            replayed.append(dlq_id)
        return replayed

    async def purge(self, dlq_ids: builtins.list[str] | None = None) -> int:
        """Delete the given entries, or the whole DLQ when `dlq_ids` is None."""
        if dlq_ids is None:
            n = await self.size()
            await self._redis.delete(self._keys.dlq)
            return n
        return int(await self._redis.xdel(self._keys.dlq, *dlq_ids)) if dlq_ids else 0


__all__ = ["DeadLetter", "DeadLetters", "dlq_fields"]
