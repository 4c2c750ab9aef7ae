"""Model families from config: any model id maps to a call lane by `claude.models` and the
`[[claude.families]]` rules, and a family added in config alone gets its own lane, rate
limits, prices and ledger rows, with no code change.

The end-to-end test runs a real worker (`stages:app`, every stage) against a real Redis and
the fake Claude API; the others run the router stage or the checks at start.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from redis.asyncio import Redis

from pipeline import ConfigError, Fail, Keys, Settings, load_settings
from pipeline.claude.ledger import Ledger
from pipeline.claude.pricing import PriceTable, check_prices
from pipeline.claude.routing import family_of
from pipeline.claude.task import Usage
from pipeline.fake_claude import FakeClaudeConfig, run_fake_claude_in_thread
from pipeline.runtime.redis_conn import Availability
from stages import claude_call
from tests.helpers.outcomes import tally
from tests.helpers.workers import Workers, wait_until
from tests.stages.test_router import route, routed

pytestmark = pytest.mark.anyio

#: Today's families plus `fable`, a rule sending the `mythos` ids to the Opus lane, a price
#: and rate limits for fable, and a router rule that sends `story` tasks there.
FAMILIES = """
[claude.models]
haiku = "claude-haiku-5-5"
sonnet = "claude-sonnet-5-5"
opus = "claude-opus-5-5"
fable = "claude-fable-5"

[[claude.families]]
family = "opus"
match = ["claude-mythos-*"]

[[router.rules]]
types = ["story"]
family = "fable"

[ratelimit.limits.fable]
rpm = 600
"""
TODAYS_PRICES = """
[[prices.tables]]
from = "{day}"
[prices.tables.models]
haiku = {{ input = 1.0, output = 5.0 }}
sonnet = {{ input = 3.0, output = 15.0 }}
opus = {{ input = 5.0, output = 25.0 }}
"""
FABLE_PRICE = "fable = { input = 2.0, output = 10.0 }\n"
NO_FABLE_PRICE = FAMILIES + TODAYS_PRICES.format(day="2025-10-01")
FABLE = NO_FABLE_PRICE + FABLE_PRICE


@pytest.fixture
async def client(redis_url: str, anyio_backend: str) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_url)
    yield r
    await r.aclose()


def load(tmp_path: Path, toml: str, env: dict[str, str] | None = None, **kw: Any) -> Settings:
    path = tmp_path / "pipeline.toml"
    path.write_text(toml)
    return load_settings(path, env=env or {}, **kw)


def config_error(tmp_path: Path, toml: str, **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, toml, **kw)
    return info.value


# ---- end to end ------------------------------------------------------------------------------


def test_a_family_added_in_config_alone_gets_its_own_lane_end_to_end(
    fast_env: dict[str, str], prefix: str, rclient: redis.Redis, tmp_path: Path
) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text(FABLE)
    settings = load_settings(config, env=fast_env)
    keys = Keys(prefix)
    tasks = {
        "by-id": {"model": "claude-fable-5"},
        "by-alias": {"model": "Fable"},
        "dated": {"model": "claude-fable-5-20260301"},  # the built-in rule: names `fable`
        "routed": {"type": "story"},  # auto, by the router rule
        "mythos": {"model": "claude-mythos-5"},  # by the [[claude.families]] rule
        "unknown": {"model": "claude-poem-1"},
    }
    with run_fake_claude_in_thread(FakeClaudeConfig(latency_ms=5, seed=3)) as fake:
        env = {**fast_env, "ANTHROPIC_API_KEY": "sk-test-fable", "PIPELINE_CONFIG": str(config),
               "PIPELINE_CLAUDE__BASE_URL": fake.base_url}  # fmt: skip
        workers = Workers(env, tmp_path, app="stages:app")
        try:
            worker = workers.start()
            for task_id, fields in tasks.items():
                rclient.xadd(keys.ingress, {"id": task_id, "prompt": f"tell {task_id}", **fields})
            wait_until(lambda: all(rclient.exists(keys.result(t)) for t in tasks), 60,
                       what=f"every result ({worker.log()[-2000:]})")  # fmt: skip
        finally:
            workers.stop_all()
        asked = sorted(fake.stats()["model_by_request"].values())

    results = {t: {k.decode(): v.decode() for k, v in rclient.hgetall(keys.result(t)).items()}
               for t in tasks}  # fmt: skip
    tally(rclient, prefix).assert_exactly_once(list(tasks))
    # The API was asked exactly the ids the tasks named (the alias and the rule: fable's id).
    assert asked == sorted(["claude-fable-5", "claude-fable-5", "claude-fable-5-20260301",
                            "claude-fable-5", "claude-mythos-5"])  # fmt: skip
    for task_id in ("by-id", "by-alias", "dated", "routed", "mythos"):
        assert results[task_id]["status"] == "completed", results[task_id]
    # Its own lane: claude-call's group on <prefix>:call:fable read the four fable tasks, and
    # the Opus lane the mythos one.
    delivered = {}
    for family in settings.claude.models:
        (group,) = rclient.xinfo_groups(keys.stream("call", family))
        assert group["name"].decode() == "claude-call"
        delivered[family] = group["entries-read"] or 0  # nil: never read
    assert delivered == {"haiku": 0, "sonnet": 0, "opus": 1, "fable": 4}  # the fake never fails
    # Its own rate limits: the limiter keeps a (key, fable) state of its own.
    families = {k.decode().rsplit(":", 1)[1] for k in rclient.scan_iter(f"{prefix}:{{rl}}:*")}
    assert {"fable", "opus"} <= families
    # Its own price: each result and the ledger charge fable's tokens at fable's rates; the
    # mythos id is priced as the family the rule gives it.
    prices = PriceTable.from_settings(settings)
    for task_id in ("by-id", "dated", "mythos"):
        result = results[task_id]
        usage = Usage(input_tokens=int(result["input_tokens"]),
                      output_tokens=int(result["output_tokens"]))  # fmt: skip
        per_mtok = (2, 10) if task_id != "mythos" else (5, 25)
        cost = usage.input_tokens * per_mtok[0] + usage.output_tokens * per_mtok[1]
        assert prices.cost_micro_usd(result["model"], usage) == cost > 0
        assert float(result["cost_usd"]) == pytest.approx(cost / 1e6), task_id
    # ...and so does the ledger `pipeline cost` reads: fable's calls at fable's price.
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    ledger = {k.decode(): int(v) for k, v in rclient.hgetall(keys.ledger(today)).items()}
    fable_pico = sum(v for k, v in ledger.items()
                     if k.startswith("claude-fable-5") and k.endswith("|cost_pico"))  # fmt: skip
    fable_tasks = [results[t] for t in ("by-id", "by-alias", "dated", "routed")]
    assert fable_pico == sum(
        int(r["input_tokens"]) * 2_000_000 + int(r["output_tokens"]) * 10_000_000
        for r in fable_tasks
    )
    assert results["unknown"]["status"] == "failed"
    assert results["unknown"]["error"].startswith(
        "unknown model 'claude-poem-1': use auto, haiku, sonnet, opus, fable, "
    )


# ---- the mapping -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("fable", "fable"),  # an alias
        ("claude-fable-5", "fable"),  # a configured id
        ("claude-mythos-5", "opus"),  # a rule
        ("claude-mythos-5-2", "opus"),
        ("CLAUDE-MYTHOS-PREVIEW", "opus"),  # globs see the lower-cased id
        ("claude-fable-5-1", "fable"),  # the built-in rule
        ("anthropic.claude-fable-5-v1:0", "fable"),
        ("claude-haiku-4-5", "haiku"),  # today's families as before
        ("claude-poem-1", None),
        ("mythos", None),  # no alias, and the glob wants the whole id
    ],
)
def test_family_of_aliases_ids_rules_then_the_built_in_rule(
    tmp_path: Path, model: str, family: str | None
) -> None:
    assert family_of(model, load(tmp_path, FABLE).claude) == family


def test_configured_ids_come_before_rules_and_rules_before_the_built_in_rule(
    tmp_path: Path,
) -> None:
    toml = FABLE + '[[claude.families]]\nfamily = "sonnet"\nmatch = ["claude-*-5"]\n'
    claude = load(tmp_path, toml).claude
    assert family_of("claude-fable-5", claude) == "fable"  # its own configured id
    assert family_of("claude-opus-5", claude) == "sonnet"  # the rule beats the id's name
    assert family_of("claude-mythos-5", claude) == "opus"  # the first rule that matches
    assert family_of("claude-opus-5-1", claude) == "opus"  # no rule: the built-in one


async def test_a_rule_maps_a_new_id_into_an_existing_family(
    client: Redis, fast_env: dict[str, str], tmp_path: Path
) -> None:
    settings = load(tmp_path, '[[claude.families]]\nfamily = "opus"\nmatch = ["claude-mythos-*"]\n',
                    env=fast_env)  # fmt: skip
    out = routed(await route(client, settings, prompt="q", model="claude-mythos-5"))
    assert (out.family, out.model) == ("opus", "claude-mythos-5")
    # A router rule may name such an id too: it is checked by the same function.
    toml = ('[[claude.families]]\nfamily = "opus"\nmatch = ["claude-mythos-*"]\n'
            '[[router.rules]]\ntypes = ["review"]\nmodel = "claude-mythos-5"\n')  # fmt: skip
    settings = load(tmp_path, toml, env=fast_env)
    out = routed(await route(client, settings, prompt="q", type="review"))
    assert (out.family, out.model) == ("opus", "claude-mythos-5")


async def test_an_id_no_rule_maps_is_refused_in_one_line_naming_what_is_accepted(
    client: Redis, fast_env: dict[str, str], tmp_path: Path
) -> None:
    outcome = await route(client, load(tmp_path, "", env=fast_env), prompt="q",
                          model="claude-fable-5")  # fmt: skip
    assert outcome == Fail(
        "unknown model 'claude-fable-5': use auto, haiku, sonnet, opus, a claude id naming one "
        "of those families (claude-<family>-...), or add the family to [claude.models] "
        "(docs/ROUTING.md)"
    )
    settings = load(tmp_path, FABLE, env=fast_env)
    outcome = await route(client, settings, prompt="q", model="gpt-4o")
    assert outcome == Fail(
        "unknown model 'gpt-4o': use auto, haiku, sonnet, opus, fable, a claude id naming one "
        "of those families (claude-<family>-...), an id matching claude.families "
        "(claude-mythos-*), or add the family to [claude.models] (docs/ROUTING.md)"
    )


def test_lanes_and_their_streams_follow_the_configured_families(tmp_path: Path) -> None:
    settings = load(tmp_path, FABLE)
    assert claude_call.stage(settings).lanes == ("haiku", "sonnet", "opus", "fable")
    assert Keys("pipeline").stream("call", "fable") == "pipeline:call:fable"


# ---- checked at start ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[[claude.families]]\nfamily = "mythos"\nmatch = ["claude-mythos-*"]\n',
            "claude.families[0].family: 'mythos' not one of haiku, opus, sonnet (a family is "
            "added in [claude.models])",
        ),
        (
            '[[claude.families]]\nfamily = "opus"\nmatch = []\n',
            "claude.families[0].match: give at least one glob, e.g. 'claude-mythos-*'",
        ),
        (
            '[[claude.families]]\nfamily = "opus"\n',
            "claude.families[0]: Object missing required field `match`",
        ),
        (
            '[[claude.families]]\nfamily = "opus"\nmatch = ["claude-mythos-*"]\n'
            '[[claude.families]]\nfamily = "opus"\nmatch = ["claude-x-*", "Claude-Mythos-*"]\n',
            "claude.families[1].match[1]: 'Claude-Mythos-*': ids are matched lower-cased; "
            "write it so",
        ),
        (
            '[[claude.families]]\nfamily = "opus"\nmatch = ["*"]\n',
            "claude.families[0].match[0]: '*' matches every model id: no unknown model would "
            "be refused",
        ),
        (
            '[[claude.families]]\nfamily = "opus"\nmatch = ["claude mythos"]\n',
            "claude.families[0].match[0]: 'claude mythos' is no model id glob",
        ),
        (
            '[[claude.families]]\nfamily = "opus"\nmatches = ["claude-mythos-*"]\n',
            "claude.families[0].matches: unknown setting",
        ),
        (
            '[claude.models]\nhaiku = "claude-haiku-5-5"\nsonnet = "claude-sonnet-5-5"\n'
            'Fable = "claude-fable-5"\n',
            "claude.models.Fable: 'Fable' cannot name a family: lower-case letters, digits and "
            "'-', at most 32 characters, not 'auto'",
        ),
        (
            '[claude.models]\nsonnet = "claude-sonnet-5-5"\nauto = "claude-haiku-5-5"\n',
            "claude.models.auto: 'auto' cannot name a family",
        ),
        (
            '[claude.models]\nsonnet = "claude-sonnet-5-5"\n"fa:ble" = "claude-fable-5"\n',
            "claude.models.fa:ble: 'fa:ble' cannot name a family",
        ),
        (
            '[claude.models]\nsonnet = "claude-sonnet-5-5"\nfable = ""\n',
            "claude.models.fable: '' is no model id",
        ),
        ("[claude]\nmodels = {}\n", "claude.models: needs at least one family"),
        (
            # A [claude.models] table replaces the defaults: a family left out says so.
            '[claude.models]\nfable = "claude-fable-5"\n',
            "router.default_family: 'sonnet' not one of fable ([claude.models] replaces the "
            "default families haiku, sonnet, opus: list each one you keep)",
        ),
        (
            '[claude.models]\nsonnet = "claude-sonnet-5-5"\nfable = "claude-fable-5"\n',
            "router.rules[0].family: 'haiku' not one of fable, sonnet ([claude.models] replaces",
        ),
    ],
)
def test_bad_families_fail_at_start_naming_the_field(
    tmp_path: Path, toml: str, message: str
) -> None:
    assert str(config_error(tmp_path, toml)).startswith(f"config: {message}")


# ---- prices ----------------------------------------------------------------------------------


def test_an_unpriced_family_costs_0_and_the_ledger_says_so_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a budget, the policy is the ledger's: counted at 0, logged once per worker."""
    settings = load(tmp_path, NO_FABLE_PRICE)
    prices = PriceTable.from_settings(settings)
    usage = Usage(input_tokens=1000, output_tokens=100)
    assert prices.cost_pico("claude-fable-5", usage) == 0
    assert prices.on(datetime.date(2026, 3, 1)).unpriced() == {"fable": "claude-fable-5"}
    with caplog.at_level(logging.WARNING, logger="pipeline.claude.ledger"):
        Ledger(Redis(), Keys("p"), settings, Availability(settings.redis.url))
    assert "no price for model 'claude-fable-5': counted at 0" in caplog.text


def test_with_a_budget_every_family_must_be_priced(tmp_path: Path) -> None:
    """An unpriced call would reserve and settle 0: no budget would bound it. So with a
    budget on, a family with no price stops the process at start."""
    err = config_error(tmp_path, NO_FABLE_PRICE, budget__daily_usd=5)
    assert str(err) == (
        "config: prices.tables[0].models: no price for family 'fable' (claude-fable-5): the "
        "budget cannot bound its calls; add fable = { input = ..., output = ... } (USD per "
        "million tokens)"
    )
    assert config_error(tmp_path, NO_FABLE_PRICE, budget__types={"story": 1.0}).field == (
        "prices.tables[0].models"
    )
    assert load(tmp_path, FABLE, budget__daily_usd=5).budget.daily_usd == 5


def test_a_family_is_priced_by_its_name_or_its_configured_id(tmp_path: Path) -> None:
    by_id = NO_FABLE_PRICE + '"claude-fable-5" = { input = 2.0, output = 10.0 }\n'
    settings = load(tmp_path, by_id, budget__daily_usd=5)  # priced: the budget may start
    prices = PriceTable.from_settings(settings)
    usage = Usage(input_tokens=1000)
    assert prices.cost_micro_usd("claude-fable-5", usage) == 2000
    assert prices.cost_micro_usd("claude-fable-5-20260301", usage) == 2000  # as its family
    assert prices.cost_micro_usd("claude-mythos-5", usage) == 5000  # the rule's family


def test_only_tables_in_force_from_today_on_must_price_every_family(tmp_path: Path) -> None:
    """A past table prices past days: it need not know a family added since."""
    old = TODAYS_PRICES.format(day="2025-01-01")  # no fable
    settings = load(tmp_path, FAMILIES + old + TODAYS_PRICES.format(day="2025-10-01") + FABLE_PRICE)
    assert [str(t.from_) for t in settings.prices.tables] == ["2025-01-01", "2025-10-01"]
    assert check_prices(_with_budget(settings))
    later = datetime.date(2025, 6, 1)  # on a day the old table was in force, it must price it
    with pytest.raises(ConfigError, match=r"prices\.tables\[0\]\.models: no price for family"):
        check_prices(_with_budget(settings), day=later)


def _with_budget(settings: Settings) -> Settings:
    budget = msgspec.structs.replace(settings.budget, daily_usd=5.0)
    return msgspec.structs.replace(settings, budget=budget)


def test_the_defaults_route_and_price_todays_families_and_no_other() -> None:
    settings = Settings()
    assert settings.claude.families == []
    assert PriceTable.from_settings(settings).on(datetime.date(2026, 3, 1)).unpriced() == {}
    claude = settings.claude
    assert family_of("claude-opus-4-8", claude) == "opus"
    assert family_of("claude-fable-5", claude) is None  # a family of its own: add it
