"""Turning outcomes into the records of `handoff.lua`, and sending them in batches.

Outcomes of one stage are group-committed: while one batch is in flight to Redis, the next
ones collect, so a busy stage sends one script call per batch rather than one per entry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(slots=True)
class Record:
    """The actions for one entry, keyed by the keys they touch (resolved to indexes later)."""

    entry_id: str
    expected_deliveries: int  # 0 = no fence check needed
    actions: list[tuple[object, ...]] = field(default_factory=list)
    status: asyncio.Future[int] | None = None

    def xadd(self, key: str, fields: Mapping[str | bytes, str | bytes], maxlen: int = 0) -> None:
        self.actions.append(("XADD", key, maxlen, fields))

    def zadd(self, key: str, delay_ms: int, member: bytes) -> None:
        self.actions.append(("ZADD", key, delay_ms, member))

    def result(
        self,
        key: str,
        ttl_s: int,
        fields: Mapping[str, str],
        done_key: str,
        done_maxlen: int,
        event: Mapping[str, str],
    ) -> None:
        self.actions.append(("RESULT", key, ttl_s, fields, done_key, done_maxlen, event))


def build_call(stream: str, records: list[Record]) -> tuple[list[str], list[object]]:
    """KEYS and the record part of ARGV for one `handoff.lua` call."""
    keys = [stream]
    index: dict[str, int] = {stream: 1}

    def ix(key: str) -> int:
        if key not in index:
            keys.append(key)
            index[key] = len(keys)
        return index[key]

    args: list[object] = []
    for rec in records:
        args += (rec.entry_id, rec.expected_deliveries, len(rec.actions))
        for action in rec.actions:
            kind = action[0]
            if kind == "XADD":
                _, key, maxlen, fields = action
                args += ("XADD", ix(key), maxlen, len(fields))  # type: ignore[arg-type]
                for k, v in fields.items():  # type: ignore[attr-defined]
                    args += (k, v)
            elif kind == "ZADD":
                _, key, delay_ms, member = action
                args += ("ZADD", ix(key), delay_ms, member)  # type: ignore[arg-type]
            else:
                _, key, ttl_s, fields, done_key, done_maxlen, event = action
                args += ("RESULT", ix(key), ttl_s, len(fields))  # type: ignore[arg-type]
                for k, v in fields.items():  # type: ignore[attr-defined]
                    args += (k, v)
                args += (ix(done_key), done_maxlen, len(event))  # type: ignore[arg-type]
                for k, v in event.items():  # type: ignore[attr-defined]
                    args += (k, v)
    return keys, args


__all__ = ["Record", "build_call"]
