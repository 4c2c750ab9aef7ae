from __future__ import annotations

from pipeline.pricing import cost_micro_usd, usd
from pipeline.task import Usage


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


def test_unknown_model_costs_nothing_and_usd_formats() -> None:
    assert cost_micro_usd("gpt-4", Usage(input_tokens=10)) == 0
    assert usd(1_234_567) == "1.234567"
