"""A deterministic instance of a JSON schema: the fake's tool inputs and structured outputs.

Covers what tool and output schemas use: objects (every property, the required ones first; a
required name without a property gets a string), arrays (`items`, `prefixItems`,
`minItems`/`maxItems`, `uniqueItems`), strings (`minLength`/`maxLength`, common `format`s),
integers and numbers within their bounds (`multipleOf` for integers), booleans, null, `enum`
(its first value), `const`, `anyOf`/`oneOf` (the first non-null branch), `allOf` (merged) and
local `$ref`s. `pattern` and `not` are not honoured. The values are drawn from a generator
seeded by the caller, so the same request always gets the same instance.
"""

from __future__ import annotations

import math
import random
import uuid
from typing import Any

_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
    "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
)  # fmt: skip
_FORMATS = {
    "date-time": "2025-01-02T03:04:05Z",
    "date": "2025-01-02",
    "time": "03:04:05Z",
    "email": "fake@example.com",
    "uri": "https://example.com/fake",
    "url": "https://example.com/fake",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
}
#: Below this depth objects get only their required properties and arrays only `minItems`
#: items, so a recursive schema (a tree) ends; past `_MAX_DEPTH` a value is a plain string.
_SHALLOW_DEPTH = 6
_MAX_DEPTH = 24
_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")


def instance(schema: object, seed: str) -> Any:
    """A value valid against `schema` (as far as the rules above go), the same for a seed."""
    return _Generator(schema, random.Random(seed)).value(schema, 0)


class _Generator:
    __slots__ = ("_rng", "_root")

    def __init__(self, root: object, rng: random.Random) -> None:
        self._root = root
        self._rng = rng

    def value(self, schema: object, depth: int) -> Any:
        if not isinstance(schema, dict) or depth > _MAX_DEPTH:
            return self._string({})
        schema = self._resolve(schema, depth)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[0]
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                return self.value(_first_non_null(branches), depth + 1)
        kind = _type_of(schema)
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._number(schema)
        if kind == "boolean":
            return self._rng.random() < 0.5
        if kind == "null":
            return None
        return self._string(schema)

    def _resolve(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        """Follow a local `$ref` and merge `allOf` into one schema."""
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            target: object = self._root
            for part in ref[1:].split("/")[1:]:
                part = part.replace("~1", "/").replace("~0", "~")
                target = target.get(part) if isinstance(target, dict) else None
            if isinstance(target, dict) and depth < _MAX_DEPTH:
                rest = {k: v for k, v in schema.items() if k != "$ref"}
                schema = {**self._resolve(target, depth + 1), **rest}
        parts = schema.get("allOf")
        if isinstance(parts, list) and parts:
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in parts:
                if isinstance(part, dict):
                    _merge(merged, self._resolve(part, depth + 1))
            schema = merged
        return schema

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        required = [r for r in required if isinstance(r, str)] if isinstance(required, list) else []
        optional = [p for p in properties if p not in required] if depth < _SHALLOW_DEPTH else []
        out: dict[str, Any] = {}
        for name in [*required, *optional]:
            if name not in out:
                out[name] = self.value(properties.get(name, {"type": "string"}), depth + 1)
        return out

    def _array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        prefix = prefix if isinstance(prefix, list) else []
        low = _int_or(schema.get("minItems"), 0)
        high = _int_or(schema.get("maxItems"), max(low, len(prefix), 1))
        wanted = max(low, len(prefix), 1) if depth < _SHALLOW_DEPTH else low
        count = min(wanted, high)
        items = schema.get("items", {})
        item_schema = items if isinstance(items, dict) else {}
        unique = schema.get("uniqueItems") is True
        out = [self.value(s, depth + 1) for s in prefix[:count]]
        while len(out) < count:
            item = self.value(item_schema, depth + 1)
            for _ in range(8 if unique else 0):  # a few draws to find an unseen value
                if item not in out:
                    break
                item = self.value(item_schema, depth + 1)
            out.append(item)
        return out

    def _string(self, schema: dict[str, Any]) -> str:
        fmt = schema.get("format")
        if fmt == "uuid":
            bits = self._rng.getrandbits(128)
            text = str(uuid.UUID(int=bits, version=4))
        elif isinstance(fmt, str) and fmt in _FORMATS:
            text = _FORMATS[fmt]
        else:
            text = " ".join(self._rng.choices(_WORDS, k=2))
        low = _int_or(schema.get("minLength"), 0)
        high = _int_or(schema.get("maxLength"), max(low, len(text)))
        while len(text) < low:
            text += " " + self._rng.choice(_WORDS)
        return text[: max(low, min(high, len(text)))]

    def _integer(self, schema: dict[str, Any]) -> int:
        (low, low_open), (high, high_open) = _bounds(schema)
        low_i, high_i = math.ceil(low), math.floor(high)
        if low_open and low_i == low:
            low_i += 1
        if high_open and high_i == high:
            high_i -= 1
        if high_i < low_i:
            return low_i
        value = self._rng.randint(low_i, min(high_i, low_i + 1000))
        step = schema.get("multipleOf")
        if type(step) is int and step > 0:
            value = -(-value // step) * step
            if value > high_i:
                value -= step
        return value

    def _number(self, schema: dict[str, Any]) -> float:
        (low, _), (high, _) = _bounds(schema)
        if high <= low:
            return low
        value = low + (high - low) * (0.25 + 0.5 * self._rng.random())
        rounded = round(value, 2)
        return rounded if low < rounded < high else value


def _type_of(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k in _TYPES]
        kind = next((k for k in kinds if k != "null"), kinds[0] if kinds else None)
    if kind in _TYPES:
        return str(kind)
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return "string"


def _first_non_null(branches: list[Any]) -> object:
    for branch in branches:
        if not (isinstance(branch, dict) and branch.get("type") == "null"):
            return branch
    return branches[0]


def _merge(into: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        if key == "properties" and isinstance(value, dict):
            into["properties"] = {**into.get("properties", {}), **value}
        elif key == "required" and isinstance(value, list):
            into["required"] = [*into.get("required", []), *value]
        else:
            into.setdefault(key, value)


def _int_or(value: object, default: int) -> int:
    return value if type(value) is int and value >= 0 else default


def _bounds(schema: dict[str, Any]) -> tuple[tuple[float, bool], tuple[float, bool]]:
    """(low, exclusive), (high, exclusive) of a numeric schema; open ends span 100."""
    low = _bound(schema, "minimum", "exclusiveMinimum")
    high = _bound(schema, "maximum", "exclusiveMaximum")
    if low is None and high is None:
        return (0.0, False), (100.0, False)
    if low is None:
        assert high is not None
        return (0.0 if high[0] > 0 else high[0] - 100.0, False), high
    if high is None:
        return low, (low[0] + 100.0, False)
    return low, high


def _bound(schema: dict[str, Any], inclusive: str, exclusive: str) -> tuple[float, bool] | None:
    for name, is_open in ((exclusive, True), (inclusive, False)):
        value = schema.get(name)
        if type(value) in (int, float):
            return float(value), is_open  # type: ignore[arg-type]
    return None
