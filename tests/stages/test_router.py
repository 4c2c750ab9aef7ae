"""router: model choice -> family lane and model id, auto rules, max_tokens defaults and caps."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from pipeline import Fail, Forward, Keys, Message, Services, Settings, load_settings
from pipeline.request import parse_request
from pipeline.task import Routed
from pipeline.wire import ENVELOPE_FIELD, decode_entry, encode_body, encode_envelope
from stages import router

pytestmark = pytest.mark.anyio
MODELS = {"haiku": "claude-haiku-5-5", "sonnet": "claude-sonnet-5-5", "opus": "claude-opus-5-5"}


@pytest.fixture
async def client(redis_url: str, anyio_backend: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url)
    yield redis
    await redis.aclose()


def routing(fast_env: dict[str, str], **overrides: Any) -> Settings:
    return load_settings(env=fast_env, **overrides)


async def route(client: Redis, settings: Settings, **fields: str) -> Forward | Fail:
    """Run the router on the Request that cache-check would hand it for these fields."""
    handler = await router.build(Services(settings, client, Keys(settings.prefix)))
    outcome = await handler(message(fields, settings))
    assert isinstance(outcome, Forward | Fail)
    return outcome


def message(fields: dict[str, str], settings: Settings) -> Message:
    entry_id = f"{int(time.time() * 1000)}-0"
    ingress = decode_entry(entry_id, {k.encode(): v.encode() for k, v in fields.items()}, 1 << 22)
    body = encode_body(parse_request(fields, settings))
    packed = encode_envelope(msgspec.structs.replace(ingress, body=body))
    envelope = decode_entry(entry_id, {ENVELOPE_FIELD: packed}, 1 << 22)
    return Message(envelope, entry_id, "router", None, 1)


def routed(outcome: Forward | Fail) -> Routed:
    assert isinstance(outcome, Forward), outcome
    assert outcome.to == "claude-call"
    assert isinstance(outcome.body, Routed)
    assert outcome.lane == outcome.body.family
    return outcome.body


@pytest.mark.parametrize(
    ("fields", "family", "model"),
    [
        ({}, "sonnet", MODELS["sonnet"]),  # auto, type default -> default_family
        ({"type": "classify"}, "haiku", MODELS["haiku"]),
        ({"type": "Summarise"}, "haiku", MODELS["haiku"]),
        ({"type": "essay"}, "sonnet", MODELS["sonnet"]),  # no rule for the type
        ({"model": "opus"}, "opus", MODELS["opus"]),
        ({"model": "Haiku", "type": "essay"}, "haiku", MODELS["haiku"]),
        ({"model": "sonnet", "type": "classify"}, "sonnet", MODELS["sonnet"]),  # explicit wins
        ({"model": "claude-opus-5-5"}, "opus", "claude-opus-5-5"),
        ({"model": "claude-3-5-haiku-20241022"}, "haiku", "claude-3-5-haiku-20241022"),
        ({"model": "claude-sonnet-4-5@20250929"}, "sonnet", "claude-sonnet-4-5@20250929"),
        (
            {"model": "anthropic.claude-3-haiku-20240307-v1:0"},
            "haiku",
            "anthropic.claude-3-haiku-20240307-v1:0",
        ),
    ],
)
async def test_model_choice_picks_family_and_model(
    client: Redis, fast_env: dict[str, str], fields: dict[str, str], family: str, model: str
) -> None:
    out = routed(await route(client, routing(fast_env), prompt="Is this spam?", **fields))
    assert (out.family, out.model) == (family, model)
    assert out.request.model == parse_request({"prompt": "x", **fields}, routing(fast_env)).model


async def test_long_prompts_skip_the_type_rule(client: Redis, fast_env: dict[str, str]) -> None:
    settings = routing(fast_env, router__long_prompt_chars=100)
    at_limit = routed(
        await route(client, settings, prompt="x" * 90, system="s" * 10, type="classify")
    )
    assert at_limit.family == "haiku"
    over = routed(await route(client, settings, prompt="x" * 91, system="s" * 10, type="classify"))
    assert (over.family, over.model) == ("sonnet", MODELS["sonnet"])
    explicit = routed(await route(client, settings, prompt="x" * 500, model="haiku"))
    assert explicit.family == "haiku", "an explicit model is honoured whatever the length"


async def test_a_configured_model_id_needs_no_family_name(
    client: Redis, fast_env: dict[str, str]
) -> None:
    settings = routing(fast_env, claude__models={**MODELS, "mini": "acme-mini-1"})
    out = routed(await route(client, settings, prompt="q", model="acme-mini-1"))
    assert (out.family, out.model) == ("mini", "acme-mini-1")
    aliased = routed(await route(client, settings, prompt="q", model="mini"))
    assert (aliased.family, aliased.model) == ("mini", "acme-mini-1")


@pytest.mark.parametrize(
    "model", ["gpt-4o", "claude-instant-1", "sonnet-ish", "my-haiku-model", "claude"]
)
async def test_unknown_models_fail_with_the_choices(
    client: Redis, fast_env: dict[str, str], model: str
) -> None:
    outcome = await route(client, routing(fast_env), prompt="q", model=model)
    assert outcome == Fail(
        f"unknown model '{model}': use auto, haiku, sonnet, opus or a claude-* model id"
    )


async def test_a_family_missing_from_config_is_unknown(
    client: Redis, fast_env: dict[str, str]
) -> None:
    settings = routing(fast_env, claude__models={"haiku": "h", "sonnet": "s"})
    outcome = await route(client, settings, prompt="q", model="claude-opus-4-1")
    assert outcome == Fail(
        "unknown model 'claude-opus-4-1': use auto, haiku, sonnet or a claude-* model id"
    )


@pytest.mark.parametrize(
    ("fields", "max_tokens"),
    [
        ({}, 1024),  # claude.default_max_tokens
        ({"max_tokens": "4000"}, 4000),
        ({"type": "classify"}, 50),  # the default is capped too
        ({"type": "classify", "max_tokens": "20"}, 20),
        ({"type": "classify", "max_tokens": "4000"}, 50),
        ({"type": "classify", "model": "opus", "max_tokens": "4000"}, 50),  # caps bind everyone
        ({"type": "extract", "max_tokens": "4000"}, 4000),
    ],
)
async def test_max_tokens_default_and_per_type_caps(
    client: Redis, fast_env: dict[str, str], fields: dict[str, str], max_tokens: int
) -> None:
    settings = routing(fast_env, router__max_tokens_caps={"classify": 50})
    out = routed(await route(client, settings, prompt="q", **fields))
    assert out.max_tokens == max_tokens
    assert out.request.max_tokens == (int(fields["max_tokens"]) if "max_tokens" in fields else None)


async def test_the_request_travels_on_unchanged(client: Redis, fast_env: dict[str, str]) -> None:
    settings = routing(fast_env)
    fields = {"prompt": "q", "metadata": '{"a": 1}', "cache": "false", "temperature": "0.2"}
    out = routed(await route(client, settings, **fields))
    assert out.request == parse_request(fields, settings)
