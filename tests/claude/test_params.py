"""Messages parameters passed through (`pipeline.claude.params`): each named field and `params`
reach the request's body parameters, checked, never dropped; the cache key covers every one
that can change the answer; the token estimate counts what the model reads."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.claude.config import load_settings
from pipeline.claude.request import WIRE_FIELDS, parse_request
from pipeline.claude.settings import Settings
from pipeline.claude.task import Request
from pipeline.claude.tokens import estimate_input_tokens
from pipeline.runtime.errors import InvalidTask

TOOL = {
    "name": "lookup",
    "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
}
SCHEMA = {"type": "json_schema", "schema": {"type": "object"}}


@pytest.fixture(scope="module")
def cfg() -> Settings:
    return load_settings(env={})


def parse(cfg: Settings, **fields: str) -> Request:
    """With room for a thinking budget (the default max_tokens, 1024, is the least it takes)."""
    return parse_request({"prompt": "What is the weather?", "max_tokens": "4096", **fields}, cfg)


def j(value: Any) -> str:
    return json.dumps(value)


#: field -> (its wire text, the body parameters it becomes)
NAMED: dict[str, tuple[str, dict[str, Any]]] = {
    "tools": (j([TOOL]), {"tools": [TOOL]}),
    "tool_choice": (j({"type": "auto"}), {"tool_choice": {"type": "auto"}}),
    "thinking": (
        j({"type": "enabled", "budget_tokens": 2048}),
        {"thinking": {"type": "enabled", "budget_tokens": 2048}},
    ),
    "stop_sequences": (j(["\\n\\nHuman:", "END"]), {"stop_sequences": ["\\n\\nHuman:", "END"]}),
    "top_p": ("0.95", {"top_p": 0.95}),
    "top_k": ("40", {"top_k": 40}),
    "service_tier": ("standard_only", {"service_tier": "standard_only"}),
    "output_format": (j(SCHEMA), {"output_config": {"format": SCHEMA}}),
    "cache_control": (
        j({"type": "ephemeral", "ttl": "1h"}),
        {"cache_control": {"type": "ephemeral", "ttl": "1h"}},
    ),
    "user_id": ("user-7", {"metadata": {"user_id": "user-7"}}),
    "params": (
        j({"inference_geo": "us", "brand_new": [1, 2]}),
        {"inference_geo": "us", "brand_new": [1, 2]},
    ),
}


def test_every_named_field_is_a_field_of_the_wire_format() -> None:
    assert set(NAMED) <= set(WIRE_FIELDS)


@pytest.mark.parametrize("name", sorted(NAMED))
def test_each_field_becomes_its_body_parameter_untouched(cfg: Settings, name: str) -> None:
    wire, body = NAMED[name]
    assert parse(cfg, **{name: wire}).params == body


def test_a_request_with_none_of_them_sends_no_extra_parameters(cfg: Settings) -> None:
    assert parse(cfg).params == {}


def test_all_of_them_together(cfg: Settings) -> None:
    together = {name: case for name, case in NAMED.items() if name != "top_k"}  # (thinking)
    fields = {name: wire for name, (wire, _) in together.items()}
    expected: dict[str, Any] = {}
    for _, body in together.values():
        expected.update(body)
    assert parse(cfg, **fields).params == expected


def test_extended_thinking_takes_what_the_api_allows_beside_it(cfg: Settings) -> None:
    thinking = j({"type": "enabled", "budget_tokens": 1024})
    req = parse(cfg, thinking=thinking, top_p="0.95", temperature="1", tools=j([TOOL]),
                tool_choice=j({"type": "auto"}), max_tokens="2048")  # fmt: skip
    assert req.params["top_p"] == 0.95 and req.temperature == 1.0
    disabled = parse(cfg, thinking=j({"type": "disabled"}), top_k="5", temperature="0.2")
    assert disabled.params["top_k"] == 5


def test_the_thinking_budget_is_checked_against_the_routed_max_tokens(cfg: Settings) -> None:
    thinking = j({"type": "enabled", "budget_tokens": 2048})  # the default max_tokens is 1024
    with pytest.raises(InvalidTask, match=r"^thinking\.budget_tokens: 2048 must be less than "
                                          r"max_tokens \(1024, after the router"):  # fmt: skip
        parse_request({"prompt": "What is the weather?", "thinking": thinking}, cfg)
    assert parse(cfg, thinking=thinking, max_tokens="4096").params["thinking"]["budget_tokens"]


def test_output_format_joins_the_other_output_settings_of_params(cfg: Settings) -> None:
    req = parse(cfg, output_format=j(SCHEMA), params=j({"output_config": {"effort": "low"}}))
    assert req.params == {"output_config": {"effort": "low", "format": SCHEMA}}


BAD: list[tuple[dict[str, str], str]] = [
    ({"tools": "[{"}, r"^tools: not valid JSON"),
    ({"tools": "[]"}, r"^tools: must be a non-empty JSON array"),
    ({"tools": j([{"name": "x"}])}, r"^tools\[0\]\.input_schema: a custom tool needs"),
    ({"tools": j([TOOL, TOOL])}, r"^tools\[1\]\.name: 'lookup' is defined twice"),
    ({"tool_choice": j({"type": "sometimes"})}, r"^tool_choice: must be an object whose type"),
    ({"tool_choice": j({"type": "any"})}, r"^tool_choice: asks for a tool, but no tools"),
    (
        {"tools": j([TOOL]), "tool_choice": j({"type": "tool", "name": "other"})},
        r"^tool_choice\.name: 'other' is not one of the tools",
    ),
    ({"thinking": j({"type": "enabled", "budget_tokens": 10})}, r"^thinking\.budget_tokens: must"),
    (
        {"thinking": j({"type": "enabled", "budget_tokens": 4096}), "max_tokens": "2000"},
        r"^thinking\.budget_tokens: 4096 must be less than max_tokens \(2000\)",
    ),
    (
        {
            "thinking": j({"type": "enabled", "budget_tokens": 1024}),
            "tools": j([TOOL]),
            "tool_choice": j({"type": "any"}),
        },
        r"^tool_choice: may not force a tool with extended thinking",
    ),
    ({"thinking": j({"type": "adaptive"}), "top_k": "5"}, r"^top_k: must be left out with"),
    ({"thinking": j({"type": "adaptive"}), "top_p": "0.9"}, r"^top_p: must be 0\.95 or more"),
    (
        {"thinking": j({"type": "adaptive"}), "temperature": "0.5"},
        r"^temperature: must be 1 or left out with extended thinking",
    ),
    ({"stop_sequences": j(["ok", ""])}, r"^stop_sequences: must be a JSON array of non-empty"),
    ({"top_p": "1.5"}, r"^top_p: must be a number from 0 to 1"),
    ({"top_p": "high"}, r"^top_p: must be a number, got 'high'"),
    ({"top_k": "0"}, r"^top_k: must be a whole number of at least 1"),
    ({"service_tier": "priority"}, r"^service_tier: must be auto or standard_only"),
    ({"output_format": j({"type": "json"})}, r"^output_format: must be"),
    ({"cache_control": j({"type": "persistent"})}, r"^cache_control: must be"),
    ({"user_id": "u" * 300}, r"^user_id: at most 256 characters"),
    ({"params": "[1]"}, r"^params: must be a JSON object of Messages parameters, not an array"),
    ({"params": j({"stream": True})}, r"^params\.stream: not allowed here; the pipeline streams"),
    ({"params": j({"model": "x"})}, r"^params\.model: not allowed here; give it as the 'model'"),
    ({"params": j({"tools": [1]})}, r"^params\.tools\[0\]: must be a tool definition object"),
    ({"params": j({"top_k": -1})}, r"^params\.top_k: must be a whole number"),
    (
        {"top_k": "5", "params": j({"top_k": 6})},
        r"^top_k: given twice, as a field and as params\.top_k; give it once",
    ),
    (
        {"user_id": "u", "params": j({"metadata": {"user_id": "v"}})},
        r"^user_id: given twice, as a field and as params\.metadata",
    ),
    (
        {"output_format": j(SCHEMA), "params": j({"output_config": {"format": SCHEMA}})},
        r"^output_format: given twice",
    ),
]


@pytest.mark.parametrize(("fields", "error"), BAD, ids=[e for _, e in BAD])
def test_a_bad_parameter_fails_at_ingress_naming_it(
    cfg: Settings, fields: dict[str, str], error: str
) -> None:
    with pytest.raises(InvalidTask, match=error):
        parse(cfg, **fields)


def test_parameters_count_toward_the_prompt_size_limit() -> None:
    cfg = load_settings(env={}, ingress__max_prompt_bytes=1000)
    big_tool = {**TOOL, "description": "x" * 1000}
    with pytest.raises(InvalidTask, match=r"^prompt \+ tools: \d+ bytes, over the 1000-byte"):
        parse(cfg, tools=j([big_tool]))


# ---- the cache key --------------------------------------------------------------------------

#: Parameters that can change what the model says: each one gives the request a key of its own.
KEYED = [
    "tools",
    "tool_choice",
    "thinking",
    "stop_sequences",
    "top_p",
    "top_k",
    "output_format",
    "params",
]


@pytest.mark.parametrize("name", KEYED)
def test_a_parameter_that_can_change_the_answer_changes_the_cache_key(
    cfg: Settings, name: str
) -> None:
    fields = {"tools": NAMED["tools"][0]} if name == "tool_choice" else {}
    plain = parse(cfg, **fields).request_hash
    assert parse(cfg, **fields, **{name: NAMED[name][0]}).request_hash != plain


def test_two_values_of_one_parameter_never_share_a_key(cfg: Settings) -> None:
    keys = {
        parse(cfg, stop_sequences=j(["a"])).request_hash,
        parse(cfg, stop_sequences=j(["b"])).request_hash,
        parse(cfg, thinking=j({"type": "enabled", "budget_tokens": 1024})).request_hash,
        parse(cfg, thinking=j({"type": "enabled", "budget_tokens": 2048})).request_hash,
        parse(cfg, params=j({"future_param": 1})).request_hash,
        parse(cfg, params=j({"future_param": 2})).request_hash,
    }
    assert len(keys) == 6


@pytest.mark.parametrize("name", ["user_id", "service_tier", "cache_control"])
def test_billing_and_attribution_parameters_share_the_answer(cfg: Settings, name: str) -> None:
    assert parse(cfg, **{name: NAMED[name][0]}).request_hash == parse(cfg).request_hash


def test_a_tool_s_cache_marker_does_not_change_the_key(cfg: Settings) -> None:
    marked = {**TOOL, "cache_control": {"type": "ephemeral"}}
    assert parse(cfg, tools=j([marked])).request_hash == parse(cfg, tools=j([TOOL])).request_hash


def test_a_request_without_parameters_keeps_the_key_it_had_before_they_existed(
    cfg: Settings,
) -> None:
    # The hash this request had before pass-through parameters existed (computed by that
    # release: v2 keys),
    # so an upgrade does not throw the response cache away.
    plain = parse_request({"prompt": "What is the weather?", "type": "classify"}, cfg)
    assert plain.request_hash == "023021c663cdf354207f980c2ce9f78e"


# ---- the token estimate ---------------------------------------------------------------------


def test_the_estimate_counts_tools_images_and_documents(cfg: Settings) -> None:
    plain = estimate_input_tokens(parse(cfg))
    with_tools = estimate_input_tokens(parse(cfg, tools=j([TOOL])))
    assert with_tools >= plain + 500 + len(j([TOOL])) // 4 - 1
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
    }
    pdf = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "A" * 400_000},
    }
    text = [{"type": "text", "text": "What is the weather?"}]
    with_image = parse_request({"messages": j([{"role": "user", "content": [image, *text]}])}, cfg)
    with_pdf = parse_request({"messages": j([{"role": "user", "content": [pdf, *text]}])}, cfg)
    assert estimate_input_tokens(with_image) == plain + 1_600
    assert estimate_input_tokens(with_pdf) == plain + 10_001
