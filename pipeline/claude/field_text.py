"""Reading a wire field's JSON and quoting a bad value in an error, the same way everywhere."""

from __future__ import annotations

from typing import Any

import msgspec

from pipeline.runtime.errors import InvalidTask

__all__ = ["decode_json", "kind", "show"]

_json = msgspec.json.Decoder()


def decode_json(name: str, raw: str) -> Any:
    """The field's JSON value.

    Raises:
        InvalidTask: not JSON; the message names the field.
    """
    try:
        return _json.decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidTask(f"{name}: not valid JSON ({exc})") from None


def kind(value: object) -> str:
    """What a JSON value is, for 'must be an object, got an array'."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def show(value: object, limit: int = 40) -> str:
    """A value quoted for an error message, cut so poison cannot bloat the DLQ reason."""
    if not isinstance(value, str):
        text = repr(value)
        return text[:limit] + "…" if len(text) > limit else text
    return repr(value[:limit] + "…") if len(value) > limit else repr(value)
