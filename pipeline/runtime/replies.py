"""Typed views of Redis replies.

redis-py types its replies loosely (`Any`, or unions of every shape a reply could take);
they become concrete types here, where they enter our code. Connections never decode replies
(`decode_responses=False`) and speak RESP2, so ids and field names arrive as bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast


def as_str(value: object) -> str:
    """A bytes reply (an entry id, a cursor) as text."""
    if isinstance(value, bytes):
        return value.decode()
    raise TypeError(f"expected bytes from Redis, got {type(value).__name__}")


def as_int(value: object) -> int:
    """An integer reply (Lua numbers arrive as int; a numeric string is accepted too)."""
    if isinstance(value, int | bytes | str):
        return int(value)
    raise TypeError(f"expected an integer from Redis, got {type(value).__name__}")


def as_list(value: object) -> list[object]:
    """An array reply (a Lua table arrives as a list)."""
    if isinstance(value, list):
        return cast("list[object]", value)
    raise TypeError(f"expected an array from Redis, got {type(value).__name__}")


def field_map(flat: object) -> dict[bytes, bytes]:
    """A flat `[field, value, …]` array (an entry as a Lua script returns it) as a dict."""
    it = iter(cast("list[bytes]", as_list(flat)))
    return dict(zip(it, it, strict=True))


def script_entries(value: object) -> Iterator[tuple[str, dict[bytes, bytes], int]]:
    """`{{id, {field, value, …}, deliveries}, …}` from reclaim.lua / drain.lua."""
    for entry in as_list(value):
        entry_id, flat, deliveries = as_list(entry)
        yield as_str(entry_id), field_map(flat), as_int(deliveries)


def read_entries(reply: object) -> Iterator[tuple[str, dict[bytes, bytes] | None]]:
    """XREADGROUP: `[[stream, [(id, {field: value}), …]], …]`, or None when nothing came."""
    streams = cast("list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes] | None]]]]", reply)
    for _stream, entries in streams or ():
        for entry_id, raw in entries:
            yield as_str(entry_id), raw


def range_entries(reply: object) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XRANGE / XREVRANGE: `[(id, {field: value}), …]`."""
    return cast("list[tuple[bytes, dict[bytes, bytes]]]", reply)


__all__ = [
    "as_int",
    "as_list",
    "as_str",
    "field_map",
    "range_entries",
    "read_entries",
    "script_entries",
]
