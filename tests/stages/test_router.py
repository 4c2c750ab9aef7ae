"""router: model choice -> family lane and model id, auto rules, max_tokens defaults and caps."""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from pipeline import Fail, Forward, Keys, Message, Services, Settings, load_settings
from pipeline.claude.pricing import PriceTable
from pipeline.claude.request import parse_request
from pipeline.claude.routing import family_of
from pipeline.claude.task import Routed
from pipeline.runtime.errors import ConfigError
from pipeline.runtime.wire import ENVELOPE_FIELD, decode_entry, encode_body, encode_envelope
from stages import router

pytestmark = pytest.mark.anyio
MODELS = {"haiku": "claude-haiku-5-5", "sonnet": "claude-sonnet-5-5", "opus": "claude-opus-5-5"}
PRICES = {f: {"input": 1.0, "output": 5.0} for f in MODELS}


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


@pytest.mark.parametrize(
    ("fields", "family"),
    [
        ({"type": "classify", "prompt": "x" * 24_000}, "haiku"),  # bounds are inclusive
        ({"type": "classify", "prompt": "x" * 23_990, "system": "s" * 11}, "sonnet"),  # too long
        ({"type": "moderate"}, "haiku"),
        ({"type": "translate"}, "haiku"),
        ({"type": "summarise", "max_tokens": "1024"}, "haiku"),
        ({"type": "summarize", "prompt": "x" * 12_001}, "sonnet"),  # a long summary
        ({"type": "summarise", "max_tokens": "1025"}, "sonnet"),  # a long answer wanted
        ({"type": "essay"}, "sonnet"),
        ({"type": "classify", "prompt": "x" * 50_000, "model": "haiku"}, "haiku"),  # explicit
    ],
)
async def test_default_rules_send_short_simple_work_to_haiku(
    client: Redis, fast_env: dict[str, str], fields: dict[str, str], family: str
) -> None:
    out = routed(await route(client, routing(fast_env), **{"prompt": "Is it spam?", **fields}))
    assert (out.family, out.model) == (family, MODELS[family])


RULES = """
[router]
default_family = "sonnet"

[[router.rules]]
types = ["classify"]
max_prompt_chars = 100
family = "haiku"

[[router.rules]]
min_prompt_chars = 1000
model = "claude-opus-4-1"

[[router.rules]]
types = ["essay", "report"]
min_max_tokens = 2000
max_max_tokens = 8000
family = "opus"

[[router.rules]]
types = ["classify", "chat"]
family = "haiku"
max_prompt_chars = 5000

[router.max_tokens_caps]
classify = 64
"""


def with_rules(fast_env: dict[str, str], tmp_path: Path, toml: str = RULES) -> Settings:
    path = tmp_path / "pipeline.toml"
    path.write_text(toml)
    return load_settings(path, env=fast_env)


@pytest.mark.parametrize(
    ("fields", "family", "model", "max_tokens"),
    [
        ({"type": "classify"}, "haiku", MODELS["haiku"], 64),  # rule 0, capped
        ({"type": "classify", "prompt": "x" * 101}, "haiku", MODELS["haiku"], 64),  # rule 3
        ({"type": "classify", "prompt": "x" * 1000}, "opus", "claude-opus-4-1", 64),  # rule 1
        ({"prompt": "x" * 999}, "sonnet", MODELS["sonnet"], 1024),  # no rule: default_family
        ({"type": "chat", "prompt": "x" * 2000}, "opus", "claude-opus-4-1", 1024),  # 1 before 3
        ({"type": "essay", "max_tokens": "2000"}, "opus", MODELS["opus"], 2000),  # rule 2
        ({"type": "report", "max_tokens": "8000"}, "opus", MODELS["opus"], 8000),
        ({"type": "essay", "max_tokens": "8001"}, "sonnet", MODELS["sonnet"], 8001),
        ({"type": "essay"}, "sonnet", MODELS["sonnet"], 1024),  # the default max_tokens counts
        ({"type": "classify", "model": "sonnet"}, "sonnet", MODELS["sonnet"], 64),  # honoured
        ({"type": "essay", "max_tokens": "4000", "model": "claude-haiku-4-5"},
         "haiku", "claude-haiku-4-5", 4000),
    ],
)  # fmt: skip
async def test_rules_from_config_first_match_wins(
    client: Redis,
    fast_env: dict[str, str],
    tmp_path: Path,
    fields: dict[str, str],
    family: str,
    model: str,
    max_tokens: int,
) -> None:
    settings = with_rules(fast_env, tmp_path)
    out = routed(await route(client, settings, **{"prompt": "Is it spam?", **fields}))
    assert (out.family, out.model, out.max_tokens) == (family, model, max_tokens)


async def test_no_rules_send_every_auto_task_to_the_default_family(
    client: Redis, fast_env: dict[str, str], tmp_path: Path
) -> None:
    settings = with_rules(fast_env, tmp_path, '[router]\ndefault_family = "opus"\nrules = []\n')
    out = routed(await route(client, settings, prompt="q", type="classify"))
    assert (out.family, out.model) == ("opus", MODELS["opus"])


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[[router.rules]]\ntypes = ["a"]\nfamily = "haiku"\n'
            '[[router.rules]]\ntypes = ["b"]\nfamily = "sonnet"\n'
            '[[router.rules]]\ntypes = ["c"]\nfamily = "gpt"\n',
            "router.rules[2].family: 'gpt' not one of haiku, opus, sonnet",
        ),
        (
            '[[router.rules]]\nfamily = "haiku"\n',
            "router.rules[0]: matches every task: give types, min/max_prompt_chars or "
            "min/max_max_tokens (router.default_family already takes what no rule matches)",
        ),
        (
            '[[router.rules]]\ntypes = []\nfamily = "haiku"\n',
            "router.rules[0]: matches every task",
        ),
        (
            '[[router.rules]]\nmin_prompt_chars = 500\nmax_prompt_chars = 100\nfamily = "haiku"\n',
            "router.rules[0].min_prompt_chars: 500 is greater than max_prompt_chars (100)",
        ),
        (
            '[[router.rules]]\nmin_max_tokens = 9\nmax_max_tokens = 8\nfamily = "haiku"\n',
            "router.rules[0].min_max_tokens: 9 is greater than max_max_tokens (8)",
        ),
        (
            '[[router.rules]]\ntypes = ["a"]\nfamliy = "haiku"\n',
            "router.rules[0].famliy: unknown setting",
        ),
        (
            '[[router.rules]]\ntypes = ["a"]\n',
            "router.rules[0]: give exactly one of family or model (where matches go)",
        ),
        (
            '[[router.rules]]\ntypes = ["a"]\nfamily = "haiku"\nmodel = "claude-haiku-4-5"\n',
            "router.rules[0]: give exactly one of family or model",
        ),
        (
            '[[router.rules]]\ntypes = ["a"]\nmodel = "gpt-4o"\n',
            "router.rules[0].model: 'gpt-4o' is no configured model id (claude.models), "
            "matches no claude.families rule and is no claude-* id naming one of haiku, opus, "
            "sonnet",
        ),
        (
            '[[router.rules]]\ntypes = ["Classify"]\nfamily = "haiku"\n',
            "router.rules[0].types[0]: 'Classify': task types are lower-case labels",
        ),
        (
            '[[router.rules]]\ntypes = ["a"]\nmax_prompt_chars = -1\nfamily = "haiku"\n',
            "router.rules[0].max_prompt_chars: Expected `int` >= 0",
        ),
        (
            '[[router.rules]]\ntypes = "classify"\nfamily = "haiku"\n',
            "router.rules[0].types: Expected `array`, got `str`",
        ),
        (
            '[router]\ndefault_family = "gpt"\n',
            "router.default_family: 'gpt' not one of haiku, opus, sonnet",
        ),
        (
            '[router.types]\nclassify = "haiku"\n',
            "router.types: replaced by router rules: write [[router.rules]] "
            'types = ["classify"] family = "haiku" (docs/ROUTING.md)',
        ),
        (
            "[router]\nlong_prompt_chars = 100\n",
            "router.long_prompt_chars: replaced by router rules: give max_prompt_chars",
        ),
    ],
)
def test_bad_rules_fail_at_start_naming_the_field(
    fast_env: dict[str, str], tmp_path: Path, toml: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        with_rules(fast_env, tmp_path, toml)
    assert str(info.value).startswith(f"config: {message}"), str(info.value)


async def test_a_configured_model_id_needs_no_family_name(
    client: Redis, fast_env: dict[str, str]
) -> None:
    settings = routing(
        fast_env,
        claude__models={**MODELS, "mini": "acme-mini-1"},
        prices__tables=[{"from": "2025-10-01", "models": {**PRICES, "mini": PRICES["haiku"]}}],
    )
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
        f"unknown model '{model}': use auto, haiku, sonnet, opus, a claude id naming one of "
        "those families (claude-<family>-...), or add the family to [claude.models] "
        "(docs/ROUTING.md)"
    )


async def test_a_family_missing_from_config_is_unknown(
    client: Redis, fast_env: dict[str, str]
) -> None:
    two = {"haiku": MODELS["haiku"], "sonnet": MODELS["sonnet"]}
    settings = routing(fast_env, claude__models=two)
    outcome = await route(client, settings, prompt="q", model="claude-opus-4-1")
    assert outcome == Fail(
        "unknown model 'claude-opus-4-1': use auto, haiku, sonnet, a claude id naming one of "
        "those families (claude-<family>-...), or add the family to [claude.models] "
        "(docs/ROUTING.md)"
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
    # As cache-check parsed it, but for the decision it carried: that is Routed's now.
    parsed = parse_request(fields, settings)
    assert (out.family, out.model, out.max_tokens) == ("sonnet", MODELS["sonnet"], 1024)
    assert out.request == msgspec.structs.replace(parsed, decision=msgspec.UNSET)


def test_the_docs_examples_load_and_show_the_real_defaults(tmp_path: Path) -> None:
    docs = Path(__file__).parents[2] / "docs" / "ROUTING.md"
    examples = re.findall(r"```toml\n(.*?)```", docs.read_text(), re.S)
    assert len(examples) == 6
    loaded = []
    for i, example in enumerate(examples):
        path = tmp_path / f"example{i}.toml"
        path.write_text(example)
        loaded.append(load_settings(path, env={}))
    defaults, added, ruled, router_defaults, rules, cache = loaded
    assert defaults.claude.models == Settings().claude.models, "stale default families"
    assert tuple(added.claude.models) == ("haiku", "sonnet", "opus", "fable")
    assert family_of("claude-fable-5-20260301", added.claude) == "fable"
    assert PriceTable.from_settings(added).on(datetime.date(2026, 3, 1)).unpriced() == {}
    assert family_of("claude-mythos-preview", ruled.claude) == "opus"
    assert router_defaults.router == Settings().router, "docs/ROUTING.md shows stale defaults"
    assert rules.router.rules[1].model == "claude-opus-4-1"
    assert cache.cache.ttl_for("chat") == 0
