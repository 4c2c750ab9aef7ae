"""A task's wire fields, built and checked before anything reaches Redis.

Pure (no Redis): the client and `pipeline submit --file` use it to refuse a bad task with a
message that names the field (`InvalidTask`), under the cache-check stage's own rules, so
what is accepted here is not dead-lettered later.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping

from pipeline.claude.request import WIRE_FIELDS, validate_request
from pipeline.claude.settings import Settings
from pipeline.runtime.errors import InvalidTask
from pipeline.runtime.traceparent import valid as valid_traceparent
from pipeline.runtime.wire import MAX_TASK_ID_CHARS

__all__ = ["WIRE_FIELDS", "task_fields", "with_id"]

#: Fields a Python caller may give as Python values, and the types each one takes; strings (the
#: wire form) are taken for every field. JSON-valued fields are sent as compact JSON text.
_JSON_FIELDS: dict[str, type | tuple[type, ...]] = {
    "messages": list,
    "system": list,
    "metadata": Mapping,
    "tools": list,
    "tool_choice": Mapping,
    "thinking": Mapping,
    "stop_sequences": list,
    "output_format": Mapping,
    "cache_control": Mapping,
    "params": Mapping,
}
_NUMBER_FIELDS = frozenset({"max_tokens", "temperature", "ttl", "top_p", "top_k", "deadline"})
# Producer-side checks: the stages ignore a bad traceparent (as W3C Trace Context asks), but a
# producer sending one has a bug to hear about.
_MAX_TRACESTATE_BYTES = 512


def task_fields(task: Mapping[str, object], settings: Settings | None = None) -> dict[str, str]:
    """Check one task and return its wire fields (all strings), in `WIRE_FIELDS` order.

    Accepts Python values (`max_tokens=100`, `messages=[…]`, `metadata={…}`) and their wire
    forms (`"100"`, JSON text), so a JSONL copy of an XADD validates the same way. As on the
    wire, an optional field given as None or "" counts as not given. Unknown fields are
    refused (a typo such as `max_token` would otherwise be dropped without a word).

    The rules are the cache-check stage's own: the fields are checked by `validate_request`
    with `settings` (default `Settings()`), so what this accepts is not dead-lettered later.
    Checking decides no route: that is cache-check's, once per task.

    Raises:
        InvalidTask: naming the field and what is wrong with it.
    """
    unknown = sorted(set(task) - set(WIRE_FIELDS))
    if unknown:
        raise InvalidTask(f"unknown field {unknown[0]!r} (known: {', '.join(WIRE_FIELDS)})")
    given = {k: v for k, v in task.items() if v is not None and (v != "" or k == "prompt")}
    if given.get("cache") is True:
        del given["cache"]  # DESIGN: only `false` means anything
    given.setdefault("model", "auto")
    given.setdefault("type", "default")
    fields = {name: _wire(name, given[name]) for name in WIRE_FIELDS if name in given}
    _check_producer_fields(fields)
    validate_request(fields, settings or Settings())
    return fields


def _wire(name: str, value: object) -> str:
    """One field's Python value as its wire string (validity is `validate_request`'s to judge)."""
    json_type = _JSON_FIELDS.get(name)
    if isinstance(value, str):
        text = value
    elif name in ("cache", "batch") and isinstance(value, bool):
        text = "true" if value else "false"
    elif name in _NUMBER_FIELDS and isinstance(value, int | float):
        text = str(value)  # a bool becomes "True", which validate_request refuses by name
    elif json_type is not None and isinstance(value, json_type):
        plain = dict(value) if isinstance(value, Mapping) else value
        try:
            text = json.dumps(plain, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidTask(f"{name}: cannot be encoded as JSON ({exc})") from None
    else:
        raise InvalidTask(f"{name}: must be a string, not {type(value).__name__}")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise InvalidTask(f"{name}: is not valid UTF-8 text (a lone surrogate?)") from None
    return text


def with_id(fields: dict[str, str]) -> dict[str, str]:
    """`fields` with an `id`: the one given, else a new random one (`uuid4().hex`), in
    `WIRE_FIELDS` order. The client sends every task with an id so that a task whose fate
    is unknown (a connection lost after the send) can be sent again as the same task."""
    if fields.get("id"):
        return fields
    given = {**fields, "id": uuid.uuid4().hex}
    return {name: given[name] for name in WIRE_FIELDS if name in given}


def _check_producer_fields(fields: Mapping[str, str]) -> None:
    """The fields `validate_request` leaves alone: the task id and the trace context."""
    task_id = fields.get("id")
    if task_id is not None and (
        len(task_id) > MAX_TASK_ID_CHARS or not task_id.isprintable() or " " in task_id
    ):
        raise InvalidTask(f"id: must be 1-{MAX_TASK_ID_CHARS} printable characters, no spaces")
    traceparent = fields.get("traceparent")
    if traceparent is not None and not valid_traceparent(traceparent):
        raise InvalidTask("traceparent: is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)")
    size = len(fields.get("tracestate", "").encode())
    if size > _MAX_TRACESTATE_BYTES:
        raise InvalidTask(f"tracestate: {size} bytes, over the {_MAX_TRACESTATE_BYTES}-byte limit")
