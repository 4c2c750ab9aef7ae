"""Pricing: the dated price table from config, exact integer costs, and its validation."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from pipeline.claude.config import load_settings
from pipeline.claude.pricing import PriceTable, cost_micro_usd, micro_usd, usd
from pipeline.claude.task import Usage
from pipeline.runtime.errors import ConfigError

DAY = datetime.date(2026, 3, 1)


def table(tmp_path: Path, toml: str) -> PriceTable:
    path = tmp_path / "pipeline.toml"
    path.write_text(toml)
    return PriceTable.from_settings(load_settings(path, env={}))


def config_error(tmp_path: Path, toml: str) -> ConfigError:
    path = tmp_path / "pipeline.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    return info.value


def test_cost_is_tokens_times_price_in_micro_dollars() -> None:
    usage = Usage(input_tokens=1000, output_tokens=200)
    assert cost_micro_usd("claude-sonnet-5-5", usage) == 1000 * 3 + 200 * 15
    assert cost_micro_usd("claude-haiku-5-5", usage) == 1000 * 1 + 200 * 5
    assert cost_micro_usd("claude-opus-5-5", usage) == 1000 * 5 + 200 * 25


def test_cache_writes_cost_more_and_reads_cost_a_tenth() -> None:
    writes = Usage(cache_creation_input_tokens=1000)
    reads = Usage(cache_read_input_tokens=1000)
    assert cost_micro_usd("claude-sonnet-5-5", writes) == 3750
    assert cost_micro_usd("claude-sonnet-5-5", reads) == 300


def test_one_hour_cache_writes_cost_twice_the_input_price() -> None:
    prices = PriceTable.from_settings(load_settings(env={}))
    # 1000 written: 400 with the 1-hour TTL (2x), 600 with 5 minutes (1.25x); 1000 read (0.1x)
    usage = Usage(
        input_tokens=10,
        output_tokens=7,
        cache_creation_input_tokens=1000,
        cache_creation_1h_input_tokens=400,
        cache_read_input_tokens=1000,
    )
    pico = 10 * 3_000_000 + 7 * 15_000_000 + 600 * 3_750_000 + 400 * 6_000_000 + 1000 * 300_000
    assert prices.cost_pico("claude-sonnet-5-5", usage, DAY) == pico
    assert prices.cost_micro_usd("claude-sonnet-5-5", usage, DAY) == pico // 1_000_000
    haiku = prices.cost_pico("claude-haiku-5-5", usage, DAY)
    assert haiku == 10 * 1_000_000 + 7 * 5_000_000 + 600 * 1_250_000 + 400 * 2_000_000 + 100_000_000


def test_sub_micro_rates_stay_exact_in_sums() -> None:
    """A Haiku cache read is 0.1 micro-dollars a token: per-call rounding would lose it all."""
    prices = PriceTable.from_settings(load_settings(env={}))
    one = Usage(cache_read_input_tokens=3)  # 0.3 micro-dollars
    calls = [prices.cost_pico("claude-haiku-5-5", one, DAY) for _ in range(1000)]
    assert sum(calls) == 3000 * 100_000  # 300 micro-dollars, exactly
    assert sum(micro_usd(c) for c in calls) == 0  # what rounding each call would report


def test_model_ids_fall_back_to_their_family_and_listed_ids_win(tmp_path: Path) -> None:
    prices = table(
        tmp_path,
        '[[prices.tables]]\nfrom = "2025-10-01"\n'
        "[prices.tables.models]\n"
        "haiku = { input = 1.0, output = 5.0 }\n"
        "sonnet = { input = 3.0, output = 15.0 }\n"
        "opus = { input = 5.0, output = 25.0 }\n"
        '"claude-3-5-haiku-20241022" = { input = 0.8, output = 4.0 }\n',
    )
    usage = Usage(input_tokens=1_000_000, cache_read_input_tokens=1_000_000)
    assert prices.cost_micro_usd("claude-3-5-haiku-20241022", usage, DAY) == 800_000 + 80_000
    assert prices.cost_micro_usd("claude-haiku-4-5", usage, DAY) == 1_000_000 + 100_000
    assert prices.cost_micro_usd("claude-opus-4-1", usage, DAY) == 5_000_000 + 500_000
    assert prices.cost_micro_usd("gpt-4", usage, DAY) == 0


def test_batch_price_is_half_the_list_price() -> None:
    prices = PriceTable.from_settings(load_settings(env={}))
    usage = Usage(input_tokens=1000, output_tokens=100)
    full = prices.cost_pico("claude-sonnet-5-5", usage, DAY)
    assert prices.cost_pico("claude-sonnet-5-5", usage, DAY, batch=True) * 2 == full


def test_a_day_is_priced_by_the_table_in_force_that_day(tmp_path: Path) -> None:
    prices = table(
        tmp_path,
        # out of order on purpose: tables are sorted by date
        '[[prices.tables]]\nfrom = "2026-02-01"\n'
        "models = { sonnet = { input = 2.0, output = 10.0 }, haiku = { input = 1.0, output = 5.0 },"
        " opus = { input = 5.0, output = 25.0 } }\n"
        "[[prices.tables]]\nfrom = 2025-10-01\n",  # a TOML date works as well as a string
    )
    usage = Usage(input_tokens=1000)
    cost = lambda day: prices.cost_micro_usd("claude-sonnet-5-5", usage, day)  # noqa: E731
    assert cost(datetime.date(2026, 1, 31)) == 3000
    assert cost(datetime.date(2026, 2, 1)) == 2000
    assert cost(datetime.date(2030, 1, 1)) == 2000
    assert cost(datetime.date(2020, 1, 1)) == 3000  # before every table: the oldest one


def test_default_table_is_dated_and_prices_the_configured_models() -> None:
    settings = load_settings(env={})
    assert [str(t.from_) for t in settings.prices.tables] == ["2025-10-01"]
    prices = PriceTable.from_settings(settings)
    for model in settings.claude.models.values():
        assert prices.on(DAY).rates(model) is not None


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        (
            '[[prices.tables]]\nfrom = "2025-10-01"\n'
            "models.sonnet = { input = -3.0, output = 15.0 }",
            "prices.tables[0].models.sonnet.input",
        ),
        ('[[prices.tables]]\nfrom = "2025-13-01"\n', "prices.tables[0].from"),
        ('[[prices.tables]]\nfrom = "soon"\n', "prices.tables[0].from"),
        ("[[prices.tables]]\ncache_read = 0.1\n", "prices.tables[0]"),
        (
            '[[prices.tables]]\nfrom = "2025-10-01"\ncache_read = -0.1\n',
            "prices.tables[0].cache_read",
        ),
        (
            '[[prices.tables]]\nfrom = "2025-10-01"\n[[prices.tables]]\nfrom = "2025-10-01"\n',
            "prices.tables[1].from",
        ),
        ("[prices]\ntables = []\n", "prices.tables"),
        (
            '[[prices.tables]]\nfrom = "2025-10-01"\n'
            "models.haiku = { input = 0.0000001, output = 5.0 }\n"
            "models.sonnet = { input = 3.0, output = 15.0 }\n"
            "models.opus = { input = 5.0, output = 25.0 }\n",
            "prices.tables[0].models.haiku.input",
        ),
        ('[prices]\nfrom = "2025-10-01"\n', "prices.from"),
        ('[ledger]\nbaseline_family = "gpt"\n', "ledger.baseline_family"),
        ("[ledger]\nttl_days = 0\n", "ledger.ttl_days"),
    ],
)
def test_bad_price_config_names_the_field(tmp_path: Path, toml: str, field: str) -> None:
    err = config_error(tmp_path, toml)
    assert err.field == field, str(err)
    assert field in str(err)


def test_ledger_settings_from_env() -> None:
    settings = load_settings(env={"PIPELINE_LEDGER__BASELINE_FAMILY": "opus"})
    assert settings.ledger.baseline_family == "opus"


def test_micro_rounding_and_usd_formatting() -> None:
    assert micro_usd(2_500_000) == 2  # half to even
    assert micro_usd(3_500_000) == 4
    assert micro_usd(2_500_001) == 3
    assert usd(1_234_567) == "1.234567"
    assert usd(5) == "0.000005"
    assert usd(10**15 + 1) == "1000000000.000001"  # no float rounding at any size
