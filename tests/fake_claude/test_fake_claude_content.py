"""What a reply contains for each generation parameter, as the real SDK parses it: tool calls,
thinking, structured output, stop sequences, max_tokens, and the API's validation of them."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import anthropic
import pydantic
import pytest
from anthropic.types import message_create_params
from anthropic.types.beta import message_create_params as beta_message_create_params

from pipeline.fake_claude import FakeClaudeServer, request_key
from pipeline.fake_claude.params import API_FIELDS, FIELDS
from pipeline.fake_claude.reply import planned_output_tokens, reply_text

jsonschema = pytest.importorskip("jsonschema")

SONNET = "claude-sonnet-5"
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "hourly": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "where": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
            "required": ["lat", "lon"],
        },
    },
    "required": ["city", "days"],
}
WEATHER = {"name": "get_weather", "description": "Forecast.", "input_schema": WEATHER_SCHEMA}
CLOCK = {
    "name": "get_time",
    "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}},
}
SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
#: The SDK's body fields that travel as headers instead.
HEADER_PARAMS = {"user_profile_id", "workspace_id", "betas"}


def _create(server: FakeClaudeServer, make_client: Any, **params: Any) -> Any:
    async def call() -> Any:
        async with make_client(server) as claude:
            return await claude.messages.create(
                **{"model": SONNET, "max_tokens": 2048, "messages": ASK, **params}
            )

    return asyncio.run(call())


def _valid(instance: object, schema: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(schema).validate(instance)


def _words(text: str) -> int:
    return len(text.split())


# -- top-level fields -------------------------------------------------------------------------


def test_the_fields_are_the_sdks() -> None:
    """The fake takes what the SDK can send in a body, and nothing it cannot."""
    ga = set(message_create_params.MessageCreateParamsBase.__annotations__) - HEADER_PARAMS
    beta = set(beta_message_create_params.MessageCreateParamsBase.__annotations__) - HEADER_PARAMS
    sampling = {"temperature", "top_p", "top_k"}
    assert ga | {"stream"} | sampling == API_FIELDS
    assert ga | beta | {"stream"} | sampling == FIELDS


@pytest.mark.parametrize("field", ["foo", "prompt", "n", "user", "response_format"])
def test_an_unknown_top_level_field_is_refused(
    fake: FakeClaudeServer, make_client: Any, field: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        _create(fake, make_client, extra_body={field: 1})
    assert caught.value.type == "invalid_request_error"
    assert caught.value.api_message == f"{field}: Extra inputs are not permitted"
    assert fake.stats()["params_seen"] == {}


def test_every_api_field_is_accepted_and_seen(fake: FakeClaudeServer, make_client: Any) -> None:
    params: dict[str, Any] = {
        "system": "Be brief.",
        "metadata": {"user_id": "u-1"},
        "stop_sequences": ["END"],
        "tools": [WEATHER, SEARCH],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "service_tier": "standard_only",
        "output_config": {"effort": "high"},
        "cache_control": {"type": "ephemeral"},
        "container": None,
        "inference_geo": "us",
        "speed": "standard",
        "diagnostics": {},
        "extra_body": {
            "temperature": 1,
            "top_p": 0.99,
            "context_management": {"edits": []},
            "mcp_servers": [],
        },
    }
    message = _create(fake, make_client, **params)
    assert message.stop_reason == "tool_use"
    seen = fake.stats()["params_seen"]
    sent = {k for k in params if k != "extra_body"} | set(params["extra_body"])
    assert set(seen) == sent | {"model", "max_tokens", "messages"}
    assert set(seen.values()) == {1}


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tools": {"name": "x"}}, "tools: Input should be a valid list"),
        ({"tools": [{"input_schema": {"type": "object"}}]}, "tools.0.custom.name: Field required"),
        ({"tools": [{"name": "x"}]}, "tools.0.custom.input_schema: Field required"),
        (
            {"tools": [{"name": "x y", "input_schema": {"type": "object"}}]},
            "tools.0.custom.name: String should match pattern",
        ),
        (
            {"tools": [{"name": "x", "input_schema": {"type": "array"}}]},
            "tools.0.custom.input_schema.type: Input should be 'object'",
        ),
        (
            {"tools": [{"name": "x", "input_schema": {"type": "object"}, "colour": 1}]},
            "tools.0.custom.colour: Extra inputs are not permitted",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools: Tool names must be unique."),
        ({"tools": [{"type": "Web Search"}]}, "tools.0: Input tag 'Web Search'"),
        ({"tool_choice": {"type": "auto"}}, "tool_choice may only be specified while providing"),
        (
            {"tools": [], "tool_choice": {"type": "any"}},
            "tool_choice may only be specified while providing",
        ),
        ({"tools": [WEATHER], "tool_choice": {"type": "some"}}, "tool_choice: Input tag 'some'"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool"}}, "tool_choice.tool.name: Field"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}},
            "Tool 'nope' not found",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "none", "disable_parallel_tool_use": 1}},
            "tool_choice.none.disable_parallel_tool_use: Extra inputs",
        ),
        ({"thinking": {"type": "on"}}, "thinking: Input tag 'on'"),
        ({"thinking": {"type": "enabled"}}, "thinking.enabled.budget_tokens: Field required"),
        (
            {"thinking": {"type": "enabled", "budget_tokens": 1023}},
            "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024",
        ),
        (
            {"thinking": {"type": "enabled", "budget_tokens": 2048}},
            "`max_tokens` must be greater than `thinking.budget_tokens`",
        ),
        (
            {"thinking": {"type": "adaptive", "budget_tokens": 2000}},
            "thinking.adaptive.budget_tokens: Extra inputs are not permitted",
        ),
        ({"thinking": {"type": "adaptive", "display": "full"}}, "thinking.adaptive.display"),
        (
            {"thinking": {"type": "adaptive"}, "tools": [WEATHER], "tool_choice": {"type": "any"}},
            "Thinking may not be enabled when tool_choice forces tool use.",
        ),
        (
            {"thinking": {"type": "adaptive"}, "extra_body": {"temperature": 0.5}},
            "`temperature` may only be set to 1 when thinking is enabled",
        ),
        (
            {"thinking": {"type": "adaptive"}, "extra_body": {"top_k": 5}},
            "`top_k` must be unset when thinking is enabled",
        ),
        ({"output_config": {"format": {"type": "json"}}}, "output_config.format.type"),
        (
            {"output_config": {"format": {"type": "json_schema"}}},
            "output_config.format.schema: Field required",
        ),
        ({"output_config": {"effort": "extreme"}}, "output_config.effort: Input should be"),
        ({"output_config": {"verbosity": 1}}, "output_config.verbosity: Extra inputs"),
        ({"service_tier": "priority"}, "service_tier: Input should be 'auto' or 'standard_only'"),
        ({"speed": "slow"}, "speed: Input should be 'standard' or 'fast'"),
        (
            {"stop_sequences": ["\n\n"]},
            "stop_sequences: each stop sequence must contain non-whitespace",
        ),
        (
            {
                "tools": [WEATHER],
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "toolu_x"}],
                    },
                ],
            },
            "messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks",
        ),
        (
            {
                "tools": [WEATHER],
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "content": [
                            {
                                "type": "tool_use",
                                "id": "toolu_x",
                                "name": "get_weather",
                                "input": {},
                            }
                        ],
                    },
                    {"role": "user", "content": "and?"},
                ],
            },
            "messages.1: `tool_use` ids were found without `tool_result` blocks immediately "
            "after: toolu_x",
        ),
    ],
)
def test_generation_parameters_are_validated(
    fake: FakeClaudeServer, make_client: Any, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        _create(fake, make_client, **params)
    assert caught.value.type == "invalid_request_error"
    assert message in (caught.value.api_message or ""), caught.value.api_message
    assert fake.stats()["calls_by_request"] == {}


# -- tools -------------------------------------------------------------------------------------


def test_tools_auto_says_a_few_words_then_calls_the_first_custom_tool(
    fake: FakeClaudeServer, make_client: Any
) -> None:
    params = {"tools": [SEARCH, WEATHER, CLOCK]}
    message = _create(fake, make_client, **params)
    again = _create(fake, make_client, **params)
    assert [block.type for block in message.content] == ["text", "tool_use"]
    text, call = message.content
    key = request_key({"model": SONNET, "max_tokens": 2048, "messages": ASK, **params})
    assert text.text.split()[0] == f"fake-claude:{key[:12]}"
    assert 1 <= _words(text.text) <= 12
    assert isinstance(call, anthropic.types.ToolUseBlock)
    assert call.name == "get_weather" and call.id.startswith("toolu_fake")
    _valid(call.input, WEATHER_SCHEMA)
    assert set(call.input) == set(WEATHER_SCHEMA["properties"])
    assert len(call.input["tags"]) >= 2
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    encoded = json.dumps(call.input, separators=(",", ":"))
    tool_tokens = (len("get_weather") + 3) // 4 + (len(encoded) + 3) // 4
    assert message.usage.output_tokens == _words(text.text) + tool_tokens
    assert message.usage.server_tool_use is None
    # Same request, same call, same id.
    assert again.content == message.content and again.usage == message.usage


@pytest.mark.parametrize(
    ("choice", "tool"),
    [({"type": "any"}, "get_weather"), ({"type": "tool", "name": "get_time"}, "get_time")],
)
def test_forced_tool_choice_is_a_tool_call_only(
    fake: FakeClaudeServer, make_client: Any, choice: dict[str, Any], tool: str
) -> None:
    message = _create(fake, make_client, tools=[SEARCH, WEATHER, CLOCK], tool_choice=choice)
    assert [block.type for block in message.content] == ["tool_use"]
    assert message.content[0].name == tool
    assert message.stop_reason == "tool_use"


def test_tool_choice_none_and_server_tools_give_text(
    fake: FakeClaudeServer, make_client: Any
) -> None:
    for params in (
        {"tools": [WEATHER], "tool_choice": {"type": "none"}},
        {"tools": [SEARCH]},
        {"tools": [SEARCH], "tool_choice": {"type": "any"}},
    ):
        message = _create(fake, make_client, **params)
        assert [block.type for block in message.content] == ["text"], params
        assert message.stop_reason == "end_turn"
        assert message.usage.server_tool_use is None


def test_a_tool_result_ends_the_agent_loop(fake: FakeClaudeServer, make_client: Any) -> None:
    async def loop() -> list[Any]:
        replies = []
        messages: list[Any] = list(ASK)
        async with make_client(fake) as claude:
            for _ in range(3):
                reply = await claude.messages.create(
                    model=SONNET, max_tokens=2048, messages=messages, tools=[WEATHER]
                )
                replies.append(reply)
                if reply.stop_reason != "tool_use":
                    break
                call = reply.content[-1]
                messages += [
                    {"role": "assistant", "content": reply.content},
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}
                        ],
                    },
                ]
        return replies

    first, last = asyncio.run(loop())
    assert first.stop_reason == "tool_use"
    assert last.stop_reason == "end_turn"
    assert [block.type for block in last.content] == ["text"]
    assert last.content[0].text.startswith("fake-claude:")
    assert fake.stats()["params_seen"]["tools"] == 2


def test_a_tool_call_that_does_not_fit_is_left_out(
    fake: FakeClaudeServer, make_client: Any
) -> None:
    message = _create(fake, make_client, max_tokens=14, tools=[WEATHER])
    assert [block.type for block in message.content] == ["text"]
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 14


# -- thinking ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "thinking",
    [{"type": "enabled", "budget_tokens": 1024}, {"type": "adaptive"}],
)
def test_thinking_comes_first_and_is_paid_for(
    fake: FakeClaudeServer, make_client: Any, thinking: dict[str, Any]
) -> None:
    message = _create(fake, make_client, thinking=thinking)
    again = _create(fake, make_client, thinking=thinking)
    assert [block.type for block in message.content] == ["thinking", "text"]
    thought, text = message.content
    assert isinstance(thought, anthropic.types.ThinkingBlock)
    assert 20 <= _words(thought.thinking) <= 400
    assert len(base64.b64decode(thought.signature, validate=True)) == 64
    assert text.text.startswith("fake-claude:")
    assert message.usage.output_tokens == _words(thought.thinking) + _words(text.text)
    assert message.stop_reason == "end_turn"
    assert again.content == message.content


def test_thinking_may_be_omitted_but_still_costs(fake: FakeClaudeServer, make_client: Any) -> None:
    shown = _create(fake, make_client, thinking={"type": "adaptive"})
    hidden = _create(fake, make_client, thinking={"type": "adaptive", "display": "omitted"})
    assert hidden.content[0].type == "thinking" and hidden.content[0].thinking == ""
    assert hidden.content[0].signature
    assert 20 <= _words(shown.content[0].thinking) <= 400
    assert 20 <= hidden.usage.output_tokens - _words(hidden.content[1].text) <= 400


def test_thinking_counts_toward_max_tokens(fake: FakeClaudeServer, make_client: Any) -> None:
    message = _create(fake, make_client, max_tokens=10, thinking={"type": "adaptive"})
    assert [block.type for block in message.content] == ["thinking"]
    assert _words(message.content[0].thinking) == 10
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 10


def test_thinking_then_a_tool_call(fake: FakeClaudeServer, make_client: Any) -> None:
    message = _create(
        fake, make_client, thinking={"type": "enabled", "budget_tokens": 1500}, tools=[CLOCK]
    )
    assert [block.type for block in message.content] == ["thinking", "text", "tool_use"]
    assert message.stop_reason == "tool_use"


# -- structured output -------------------------------------------------------------------------


def test_structured_output_is_an_instance_of_the_schema(
    fake: FakeClaudeServer, make_client: Any
) -> None:
    fmt = {"type": "json_schema", "schema": WEATHER_SCHEMA}
    message = _create(fake, make_client, output_config={"format": fmt})
    assert [block.type for block in message.content] == ["text"]
    text = message.content[0].text
    value = json.loads(text)
    _valid(value, WEATHER_SCHEMA)
    assert text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)  # compact
    assert message.usage.output_tokens == (len(text.encode()) + 3) // 4
    plain = _create(fake, make_client)
    schema_tokens = (len(json.dumps(WEATHER_SCHEMA, separators=(",", ":"))) + 3) // 4
    assert message.usage.input_tokens - plain.usage.input_tokens == pytest.approx(
        schema_tokens, abs=2
    )


class Forecast(pydantic.BaseModel):
    city: str
    days: int
    hourly: bool
    tags: list[str]
    kind: str | None = None


def test_sdk_parse_helper_gets_a_valid_object(fake: FakeClaudeServer, make_client: Any) -> None:
    async def call() -> Any:
        async with make_client(fake) as claude:
            return await claude.messages.parse(
                model=SONNET, max_tokens=1024, messages=ASK, output_format=Forecast
            )

    message = asyncio.run(call())
    assert isinstance(message.parsed_output, Forecast)
    assert message.parsed_output.tags


def test_structured_output_cut_by_max_tokens(fake: FakeClaudeServer, make_client: Any) -> None:
    fmt = {"type": "json_schema", "schema": WEATHER_SCHEMA}
    message = _create(fake, make_client, max_tokens=5, output_config={"format": fmt})
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 5
    assert len(message.content[0].text.encode()) <= 20
    with pytest.raises(json.JSONDecodeError):
        json.loads(message.content[0].text)


# -- stop sequences ----------------------------------------------------------------------------


def _stop_word_request() -> tuple[dict[str, Any], str, str]:
    """A request with a stop sequence its reply contains: (body, sequence, text before it)."""
    for word in ("pipeline", "stream", "task", "worker", "queue", "cache", "token", "retry"):
        sequence = f" {word} "
        body = {"model": SONNET, "max_tokens": 2048, "messages": ASK, "stop_sequences": [sequence]}
        key = request_key(body)
        text = reply_text(key, planned_output_tokens(key, 20, 400))
        if sequence in text:
            return body, sequence, text[: text.index(sequence)]
    raise AssertionError("no candidate stop sequence occurs")  # pragma: no cover


def test_a_stop_sequence_cuts_the_text(fake: FakeClaudeServer, make_client: Any) -> None:
    body, sequence, before = _stop_word_request()
    message = _create(fake, make_client, stop_sequences=body["stop_sequences"])
    assert message.content[0].text == before
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == sequence
    assert message.usage.output_tokens == _words(before)


def test_the_first_completed_stop_sequence_wins(fake: FakeClaudeServer, make_client: Any) -> None:
    # The text starts "fake-claude:<key>": "-" is completed before "claude" and ":".
    message = _create(fake, make_client, stop_sequences=["claude", ":", "-"])
    assert message.content[0].text == "fake"
    assert message.stop_sequence == "-" and message.usage.output_tokens == 1
    # A stop sequence at the very start leaves no text block at all.
    empty = _create(fake, make_client, stop_sequences=["fake-claude"])
    assert empty.content == [] and empty.stop_sequence == "fake-claude"
    assert empty.usage.output_tokens == 0


def test_an_absent_stop_sequence_changes_nothing(fake: FakeClaudeServer, make_client: Any) -> None:
    message = _create(fake, make_client, stop_sequences=["\n\nHuman:"])
    assert message.stop_reason == "end_turn" and message.stop_sequence is None


def test_a_stop_sequence_before_a_tool_call_prevents_it(
    fake: FakeClaudeServer, make_client: Any
) -> None:
    message = _create(fake, make_client, tools=[WEATHER], stop_sequences=[":"])
    assert [block.type for block in message.content] == ["text"]
    assert message.stop_reason == "stop_sequence"
