"""Ingress fields -> Request: the wire format's rules, their error messages, the canonical hash."""

from __future__ import annotations

import json

import msgspec
import pytest

from pipeline.claude.config import load_settings
from pipeline.claude.request import parse_request, prompt_chars, request_hash
from pipeline.claude.routing import Route
from pipeline.claude.settings import Settings
from pipeline.claude.task import Request
from pipeline.runtime.errors import InvalidTask


@pytest.fixture(scope="module")
def cfg() -> Settings:
    return load_settings(env={}, ingress__max_prompt_bytes=1000, ingress__max_metadata_bytes=100)


def parse(cfg: Settings, **fields: str) -> Request:
    return parse_request(fields, cfg)


def msgs(*messages: object) -> str:
    return json.dumps(list(messages))


# ---- good input -----------------------------------------------------------------------------


def test_a_bare_prompt_gets_every_default(cfg: Settings) -> None:
    req = parse(cfg, prompt="Summarise this")
    assert req.messages == [{"role": "user", "content": "Summarise this"}]
    assert (req.system, req.model, req.max_tokens, req.temperature) == (None, "auto", None, None)
    assert (req.type, req.cache, req.metadata) == ("default", True, "{}")
    assert len(req.request_hash) == 32 and int(req.request_hash, 16) >= 0


def test_every_field_is_parsed(cfg: Settings) -> None:
    req = parse(
        cfg,
        prompt="Classify: great product",
        system="You are terse.",
        model="haiku",
        max_tokens="256",
        temperature="0.25",
        type="classify",
        cache="false",
        ttl="600",
        metadata='{"order": 42}',
        id="order-42",
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    assert req.system == "You are terse."
    assert (req.model, req.max_tokens, req.temperature) == ("haiku", 256, 0.25)
    assert (req.type, req.cache, req.metadata) == ("classify", False, '{"order": 42}')


def test_multi_turn_messages_are_kept_as_given(cfg: Settings) -> None:
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
        {
            "role": "user",
            "content": [
                {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                {"type": "text", "text": "What is this?", "cache_control": {"type": "ephemeral"}},
            ],
        },
        {"role": "assistant", "content": "It is"},  # a prefill may end the conversation
    ]
    assert parse(cfg, messages=json.dumps(conversation)).messages == conversation


def test_system_as_text_blocks_keeps_cache_control(cfg: Settings) -> None:
    blocks = [
        {"type": "text", "text": "Long shared context", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Be brief."},
    ]
    assert parse(cfg, prompt="q", system=json.dumps(blocks)).system == blocks


@pytest.mark.parametrize("system", ["[draft] be brief", '["a", "b"]', "[]", "   [not json"])
def test_system_that_only_looks_like_json_stays_text(cfg: Settings, system: str) -> None:
    assert parse(cfg, prompt="q", system=system).system == system


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("HAIKU", "haiku"),
        (" Sonnet ", "sonnet"),
        ("AUTO", "auto"),
        ("claude-opus-4-1", "claude-opus-4-1"),
    ],
)
def test_model_aliases_are_normalised_ids_kept(cfg: Settings, given: str, kept: str) -> None:
    assert parse(cfg, prompt="q", model=given).model == kept


@pytest.mark.parametrize(
    ("given", "flag"), [("true", True), ("1", True), ("False", False), ("0", False)]
)
def test_cache_flag(cfg: Settings, given: str, flag: bool) -> None:
    assert parse(cfg, prompt="q", cache=given).cache is flag


def test_type_is_a_lowercase_label(cfg: Settings) -> None:
    assert parse(cfg, prompt="q", type=" Summarise ").type == "summarise"
    assert parse(cfg, prompt="q", type="extract.v2-fast_1").type == "extract.v2-fast_1"


def test_temperature_bounds_are_inclusive(cfg: Settings) -> None:
    assert parse(cfg, prompt="q", temperature="0").temperature == 0.0
    assert parse(cfg, prompt="q", temperature="1").temperature == 1.0
    assert parse(cfg, prompt="q", temperature="-0").temperature == 0.0


def test_empty_optional_fields_count_as_not_given(cfg: Settings) -> None:
    empty = dict.fromkeys(
        ("system", "model", "max_tokens", "temperature", "type", "cache", "ttl", "metadata"), ""
    )
    req = parse_request({"prompt": "q", **empty}, cfg)
    assert req == parse(cfg, prompt="q")


def test_a_field_the_wire_format_does_not_name_fails_the_task_naming_it(cfg: Settings) -> None:
    with pytest.raises(InvalidTask, match=r"^'x-team': not a field of the wire format; put "):
        parse_request({"prompt": "q", "x-team": "search"}, cfg)


def test_prompt_size_limit_is_in_utf8_bytes(cfg: Settings) -> None:
    parse(cfg, prompt="é" * 500)  # 1000 bytes: exactly the limit
    with pytest.raises(InvalidTask, match=r"^prompt: 1002 bytes, over the 1000-byte limit"):
        parse(cfg, prompt="é" * 501)


def test_prompt_chars_counts_system_and_message_text(cfg: Settings) -> None:
    req = parse(
        cfg,
        system="12345",
        messages=msgs(
            {"role": "user", "content": "abc"},
            {"role": "assistant", "content": [{"type": "text", "text": "de"}]},
            {
                "role": "user",
                "content": [{"type": "image", "source": {}}, {"type": "text", "text": "f"}],
            },
        ),
    )
    assert prompt_chars(req) == 5 + 3 + 2 + 1


# ---- bad input: each rule, with its exact message -------------------------------------------

BAD: list[tuple[dict[str, str], str]] = [
    (
        {},
        "prompt or messages: missing; give the text as 'prompt' "
        "or a JSON array of messages as 'messages'",
    ),
    ({"type": "x"}, "prompt or messages: missing"),
    (
        {"prompt": "a", "messages": msgs({"role": "user", "content": "a"})},
        "prompt and messages: both given; give exactly one of them",
    ),
    ({"prompt": ""}, "prompt: is empty"),
    ({"prompt": " \n\t"}, "prompt: is empty"),
    (
        {"prompt": "x" * 1001},
        "prompt: 1001 bytes, over the 1000-byte limit (ingress.max_prompt_bytes)",
    ),
    (
        {"prompt": "x" * 600, "system": "y" * 401},
        "prompt + system: 1001 bytes, over the 1000-byte limit (ingress.max_prompt_bytes)",
    ),
    ({"messages": "[{"}, "messages: not valid JSON ("),
    ({"messages": '{"role": "user"}'}, "messages: must be a JSON array of messages, got an object"),
    ({"messages": '"hi"'}, "messages: must be a JSON array of messages, got a string"),
    ({"messages": "[]"}, "messages: is empty; give at least one message"),
    ({"messages": '["hi"]'}, "messages[0]: must be an object with 'role' and 'content'"),
    ({"messages": msgs({"content": "hi"})}, "messages[0].role: missing"),
    (
        {"messages": msgs({"role": "bot", "content": "hi"})},
        "messages[0].role: must be 'user' or 'assistant', got 'bot'",
    ),
    (
        {"messages": msgs({"role": "system", "content": "hi"})},
        "messages[0].role: must be 'user' or 'assistant', got 'system' "
        "(put a system prompt in the 'system' field)",
    ),
    (
        {"messages": msgs({"role": "user", "content": "hi", "name": "bob"})},
        "messages[0]: unknown key 'name' (a message has only 'role' and 'content')",
    ),
    ({"messages": msgs({"role": "user"})}, "messages[0].content: missing"),
    (
        {"messages": msgs({"role": "user", "content": "a"}, {"role": "assistant", "content": ""})},
        "messages[1].content: is empty",
    ),
    (
        {"messages": msgs({"role": "user", "content": 7})},
        "messages[0].content: must be a string or a list of content blocks, got a number",
    ),
    (
        {"messages": msgs({"role": "user", "content": None})},
        "messages[0].content: must be a string or a list of content blocks, got null",
    ),
    (
        {"messages": msgs({"role": "user", "content": []})},
        "messages[0].content: is an empty list of content blocks",
    ),
    (
        {"messages": msgs({"role": "user", "content": ["hi"]})},
        "messages[0].content[0]: must be a content block object with a 'type'",
    ),
    (
        {"messages": msgs({"role": "user", "content": [{"text": "hi"}]})},
        "messages[0].content[0]: must be a content block object with a 'type'",
    ),
    (
        {"messages": msgs({"role": "user", "content": [{"type": "text", "text": " "}]})},
        "messages[0].content[0].text: must be a non-empty string",
    ),
    (
        {"messages": msgs({"role": "user", "content": [{"type": "text"}]})},
        "messages[0].content[0].text: must be a non-empty string",
    ),
    (
        {
            "messages": msgs(
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "a"}
            )
        },
        "messages[0].role: the first message must be from 'user', got 'assistant'",
    ),
    (
        {"prompt": "q", "system": '[{"type": "image"}]'},
        "system[0].type: must be 'text', got 'image'",
    ),
    ({"prompt": "q", "system": '[{"text": "a"}]'}, "system[0].type: must be 'text', got None"),
    (
        {"prompt": "q", "system": '[{"type": "text", "text": ""}]'},
        "system[0].text: must be a non-empty string",
    ),
    (
        {"prompt": "q", "system": '[{"type": "text", "text": "a", "x": 1}]'},
        "system[0]: unknown key 'x' in a system text block",
    ),
    (
        {"prompt": "q", "model": "gpt 4"},
        "model: must be auto, a family alias or a model id (no spaces, at most 128 characters), "
        "got 'gpt 4'",
    ),
    ({"prompt": "q", "model": "m" * 129}, "model: must be auto, a family alias or a model id"),
    (
        {"prompt": "q", "max_tokens": "0"},
        "max_tokens: must be a whole number from 1 to 1000000, got '0'",
    ),
    (
        {"prompt": "q", "max_tokens": "-5"},
        "max_tokens: must be a whole number from 1 to 1000000, got '-5'",
    ),
    ({"prompt": "q", "max_tokens": "12.5"}, "max_tokens: must be a whole number from 1 to 1000000"),
    ({"prompt": "q", "max_tokens": "lots"}, "max_tokens: must be a whole number from 1 to 1000000"),
    (
        {"prompt": "q", "max_tokens": "1000001"},
        "max_tokens: must be a whole number from 1 to 1000000",
    ),
    ({"prompt": "q", "max_tokens": "١٢"}, "max_tokens: must be a whole number"),  # non-ASCII digits
    ({"prompt": "q", "temperature": "hot"}, "temperature: must be a number from 0 to 1, got 'hot'"),
    ({"prompt": "q", "temperature": "1.5"}, "temperature: must be a number from 0 to 1, got '1.5'"),
    (
        {"prompt": "q", "temperature": "-0.1"},
        "temperature: must be a number from 0 to 1, got '-0.1'",
    ),
    ({"prompt": "q", "temperature": "nan"}, "temperature: must be a number from 0 to 1, got 'nan'"),
    (
        {"prompt": "q", "type": "two words"},
        "type: must be a short label (letters, digits, '_', '-', '.'; at most 64 characters), "
        "got 'two words'",
    ),
    ({"prompt": "q", "type": "t" * 65}, "type: must be a short label"),
    ({"prompt": "q", "type": "-lead"}, "type: must be a short label"),
    ({"prompt": "q", "cache": "no"}, "cache: must be true, false, 1 or 0, got 'no'"),
    ({"prompt": "q", "ttl": "0"}, "ttl: must be whole seconds from 1 to 2592000, got '0'"),
    ({"prompt": "q", "ttl": "soon"}, "ttl: must be whole seconds from 1 to 2592000, got 'soon'"),
    ({"prompt": "q", "ttl": "2592001"}, "ttl: must be whole seconds from 1 to 2592000"),
    ({"prompt": "q", "metadata": "{"}, "metadata: not valid JSON ("),
    ({"prompt": "q", "metadata": "[1]"}, "metadata: must be a JSON object, got an array"),
    ({"prompt": "q", "metadata": "null"}, "metadata: must be a JSON object, got null"),
    (
        {"prompt": "q", "metadata": json.dumps({"k": "v" * 100})},
        "metadata: 109 bytes, over the 100-byte limit (ingress.max_metadata_bytes)",
    ),
]


@pytest.mark.parametrize(("fields", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_says_what_is_wrong(cfg: Settings, fields: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidTask) as info:
        parse_request(fields, cfg)
    assert str(info.value).startswith(message), str(info.value)


def test_error_messages_cut_long_values(cfg: Settings) -> None:
    with pytest.raises(InvalidTask) as info:
        parse(cfg, prompt="q", temperature="9" * 10_000)
    assert len(str(info.value)) < 120


# ---- the canonical hash ---------------------------------------------------------------------


def test_prompt_and_the_equal_messages_hash_the_same(cfg: Settings) -> None:
    by_prompt = parse(cfg, prompt="Hello")
    by_messages = parse(cfg, messages=msgs({"role": "user", "content": "Hello"}))
    by_block = parse(
        cfg, messages=msgs({"role": "user", "content": [{"type": "text", "text": "Hello"}]})
    )
    spaced = parse(cfg, messages='[ { "content" : "Hello" , "role" : "user" } ]')
    assert by_prompt.request_hash == by_messages.request_hash == by_block.request_hash
    assert by_prompt.request_hash == spaced.request_hash


def test_key_order_inside_blocks_does_not_change_the_hash(cfg: Settings) -> None:
    block = '{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}'
    reordered = '{"cache_control": {"type": "ephemeral"}, "text": "a", "type": "text"}'
    a = f'[{{"role": "user", "content": [{block}]}}]'
    b = f'[{{"content": [{reordered}], "role": "user"}}]'
    assert parse(cfg, messages=a).request_hash == parse(cfg, messages=b).request_hash


def test_equal_values_written_differently_hash_the_same(cfg: Settings) -> None:
    a = parse(cfg, prompt="q", temperature="0.5", max_tokens="100", model="Haiku", type="Classify")
    b = parse(
        cfg, prompt="q", temperature="0.50", max_tokens="0100", model="haiku", type="classify"
    )
    assert a.request_hash == b.request_hash
    blocks = parse(cfg, prompt="q", system='[{"type": "text", "text": "Be brief."}]')
    assert blocks.request_hash == parse(cfg, prompt="q", system="Be brief.").request_hash


def test_what_does_not_change_the_answer_does_not_change_the_hash(cfg: Settings) -> None:
    base = parse(cfg, prompt="q")
    other = parse(cfg, prompt="q", cache="false", ttl="5", metadata='{"a": 1}', id="x")
    assert base.request_hash == other.request_hash


def test_the_routing_decision_not_the_model_spelling_is_hashed(cfg: Settings) -> None:
    """`auto` routed to Sonnet, `sonnet` and its full id are the same API request."""
    auto = parse(cfg, prompt="q", type="essay")
    assert auto.request_hash == parse(cfg, prompt="q", model="sonnet").request_hash
    assert auto.request_hash == parse(cfg, prompt="q", model="claude-sonnet-5-5").request_hash
    assert auto.request_hash == parse(cfg, prompt="q").request_hash  # type default, same route
    assert auto.request_hash == parse(cfg, prompt="q", max_tokens="1024").request_hash
    # A type that routes elsewhere (classify -> Haiku) is another request.
    assert parse(cfg, prompt="q", type="classify").request_hash != auto.request_hash
    both_haiku = parse(cfg, prompt="q", type="extract")
    assert parse(cfg, prompt="q", type="classify").request_hash == both_haiku.request_hash


def test_cache_control_markers_do_not_change_the_hash(cfg: Settings) -> None:
    """They change what prompt caching bills, never the answer."""
    marked = '[{"type": "text", "text": "Long context", "cache_control": %s}]'
    plain = parse(cfg, prompt="q", system="Long context")
    unmarked = parse(cfg, prompt="Long context", system="Long context")
    for marker in ('{"type": "ephemeral"}', '{"type": "ephemeral", "ttl": "1h"}'):
        system = parse(cfg, prompt="q", system=marked % marker)
        blocks = json.loads(marked % marker)
        content = parse(
            cfg, messages=msgs({"role": "user", "content": blocks}), system="Long context"
        )
        assert system.request_hash == plain.request_hash
        assert content.request_hash == unmarked.request_hash
        assert system.system != plain.system, "the markers themselves are kept for the API"


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "q2"},
        {"system": "s"},
        {"model": "haiku"},
        {"model": "claude-sonnet-4-5"},  # another model id of the same family
        {"max_tokens": "100"},
        {"temperature": "0"},
        {"type": "classify"},  # auto routes it to Haiku
        {"system": '[{"type": "text", "text": "q", "cache_control": {"type": "ephemeral"}}]'},
    ],
)
def test_what_changes_the_answer_changes_the_hash(cfg: Settings, change: dict[str, str]) -> None:
    assert (
        parse_request({"prompt": "q", **change}, cfg).request_hash
        != parse(cfg, prompt="q").request_hash
    )


def test_routing_settings_change_the_hash_of_what_they_reroute(cfg: Settings) -> None:
    def with_(**overrides: object) -> Settings:
        return load_settings(env={}, ingress__max_prompt_bytes=1000, **overrides)

    models = {"haiku": "claude-haiku-6", "sonnet": "claude-sonnet-5-5", "opus": "claude-opus-5-5"}
    upgraded = with_(claude__models=models)
    assert parse(upgraded, prompt="q", type="classify").request_hash != (
        parse(cfg, prompt="q", type="classify").request_hash
    )
    # The Sonnet request is sent exactly as before, so its cached answers stay good.
    assert parse(upgraded, prompt="q").request_hash == parse(cfg, prompt="q").request_hash
    capped = with_(router__max_tokens_caps={"classify": 10})
    assert parse(capped, prompt="q", type="classify").request_hash != (
        parse(cfg, prompt="q", type="classify").request_hash
    )
    rerouted = with_(router__rules=[{"types": ["essay"], "family": "opus"}])
    assert parse(rerouted, prompt="q", type="essay").request_hash != (
        parse(cfg, prompt="q", type="essay").request_hash
    )
    more_tokens = with_(claude__default_max_tokens=2048)
    assert parse(more_tokens, prompt="q").request_hash != parse(cfg, prompt="q").request_hash
    unrelated = with_(cache__ttl_s=5)
    assert parse(unrelated, prompt="q").request_hash == parse(cfg, prompt="q").request_hash


def test_request_hash_is_pure_and_ignores_a_stale_hash(cfg: Settings) -> None:
    req = parse(cfg, prompt="q")
    decision = Route(family="sonnet", model="claude-sonnet-5-5", max_tokens=1024)
    assert request_hash(req, decision) == req.request_hash
    stale = msgspec.structs.replace(req, request_hash="stale")
    assert request_hash(stale, decision) == req.request_hash
    refused = parse(cfg, prompt="q", model="gpt-4o")  # the router will fail it; still keyed
    assert len(refused.request_hash) == 32 and refused.request_hash != req.request_hash
