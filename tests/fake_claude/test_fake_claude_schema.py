"""The instances the fake makes for tool inputs and structured outputs are valid and stable."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.fake_claude.schema import instance

jsonschema = pytest.importorskip("jsonschema")

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat object": {
        "type": "object",
        "properties": {
            "s": {"type": "string"},
            "i": {"type": "integer"},
            "n": {"type": "number"},
            "b": {"type": "boolean"},
            "z": {"type": "null"},
        },
        "required": ["s", "i"],
    },
    "required name without a property": {"type": "object", "required": ["ghost"]},
    "enum and const": {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green"]},
            "level": {"type": "integer", "enum": [3, 5]},
            "kind": {"const": "fixed"},
        },
    },
    "bounds": {
        "type": "object",
        "properties": {
            "small": {"type": "integer", "minimum": -5, "maximum": -3},
            "open": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 12},
            "high": {"type": "integer", "minimum": 1000000},
            "low": {"type": "integer", "exclusiveMaximum": 0},
            "step": {"type": "integer", "minimum": 1, "maximum": 50, "multipleOf": 7},
            "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "tiny": {"type": "number", "minimum": 0.001, "maximum": 0.002},
        },
    },
    "strings": {
        "type": "object",
        "properties": {
            "short": {"type": "string", "maxLength": 3},
            "long": {"type": "string", "minLength": 40},
            "when": {"type": "string", "format": "date-time"},
            "day": {"type": "string", "format": "date"},
            "mail": {"type": "string", "format": "email"},
            "id": {"type": "string", "format": "uuid"},
            "site": {"type": "string", "format": "uri"},
        },
    },
    "arrays": {
        "type": "object",
        "properties": {
            "many": {"type": "array", "items": {"type": "integer"}, "minItems": 4},
            "none": {"type": "array", "items": {"type": "string"}, "maxItems": 0},
            "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "boolean"}]},
            "set": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 1000},
                "minItems": 3,
                "uniqueItems": True,
            },
            "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        },
        "required": ["many", "none", "pair", "set", "matrix"],
    },
    "nullable and unions": {
        "type": "object",
        "properties": {
            "maybe": {"type": ["null", "string"]},
            "either": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 7}]},
            "one": {"oneOf": [{"type": "boolean"}, {"type": "string"}]},
            "both": {
                "allOf": [
                    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                    {"properties": {"b": {"type": "integer"}}, "required": ["b"]},
                ]
            },
        },
        "required": ["maybe", "either", "one", "both"],
    },
    "refs": {
        "$defs": {
            "Point": {
                "type": "object",
                "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "Tree": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Tree"}},
                },
                "required": ["name"],
            },
        },
        "type": "object",
        "properties": {
            "at": {"$ref": "#/$defs/Point"},
            "path": {"type": "array", "items": {"$ref": "#/$defs/Point"}},
            "tree": {"$ref": "#/$defs/Tree"},
        },
        "required": ["at", "path"],
        "additionalProperties": False,
    },
    "untyped": {"properties": {"free": {}, "list": {"items": {"type": "boolean"}}}},
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_instance_is_valid_and_deterministic(name: str) -> None:
    schema = SCHEMAS[name]
    value = instance(schema, "seed-1")
    jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(value)
    assert instance(schema, "seed-1") == value
    if isinstance(value, dict):
        declared = set(schema.get("properties", {})) | set(schema.get("required", []))
        assert declared <= set(value)  # every property, not just the required ones


def test_another_seed_gives_other_values() -> None:
    schema = SCHEMAS["flat object"]
    values = {repr(instance(schema, f"seed-{i}")) for i in range(10)}
    assert len(values) > 1


def test_enum_takes_its_first_value() -> None:
    assert instance({"enum": ["b", "a"]}, "x") == "b"
    assert instance(SCHEMAS["enum and const"], "x") == {
        "colour": "red",
        "level": 3,
        "kind": "fixed",
    }
