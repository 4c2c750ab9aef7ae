"""The cost ledger end to end: real workers, the fake Claude API, then `pipeline cost`.

The ledger must equal, token for token, the usage the fake API reported for the calls it
answered, and its cost must be exactly those tokens x the configured price, also when a
store worker is SIGKILLed mid-run (its redelivered entries are not counted twice).
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from pipeline import load_settings
from pipeline.claude.ledger import Row, Totals, read_days
from pipeline.claude.pricing import PriceTable
from pipeline.claude.task import Usage
from pipeline.fake_claude import FakeClaudeConfig, FakeClaudeServer, run_fake_claude_in_thread
from pipeline.runtime.keys import Keys
from tests.helpers.outcomes import tally
from tests.helpers.workers import Workers, wait_until

pytestmark = pytest.mark.chaos
#: Prompt-cache prefixes: Sonnet tasks write theirs with the 1-hour TTL, Haiku ones 5 minutes.
SYSTEM_1H = [{"type": "text", "text": "You reason carefully. " * 40,
              "cache_control": {"type": "ephemeral", "ttl": "1h"}}]  # fmt: skip
SYSTEM_5M = [{"type": "text", "text": "You label things. " * 40,
              "cache_control": {"type": "ephemeral"}}]  # fmt: skip


@pytest.fixture
def fake() -> Iterator[FakeClaudeServer]:
    config = FakeClaudeConfig(latency_ms=20, overloaded_rate=0.05, seed=5)
    with run_fake_claude_in_thread(config) as server:
        yield server


@pytest.fixture
def env(fast_env: dict[str, str], fake: FakeClaudeServer) -> dict[str, str]:
    return {
        **fast_env,
        "ANTHROPIC_BASE_URL": fake.base_url,
        "ANTHROPIC_API_KEY": "good-key",
        "PIPELINE_RETRY__MAX_ATTEMPTS": "10",
    }


@pytest.fixture
def pipeline_workers(env: dict[str, str], tmp_path: Path) -> Iterator[Workers]:
    w = Workers(env, tmp_path, app="stages:app")
    yield w
    w.stop_all()


def task(i: int) -> dict[str, str]:
    """Classify/extract -> Haiku with a 5-minute cached system prefix; reason -> Sonnet with
    a 1-hour one; every fifth asks for Opus by name (its own baseline)."""
    kind = ("classify", "extract", "reason", "reason", "classify")[i % 5]
    fields = {"prompt": f"task {i}: say something", "type": kind, "max_tokens": "300"}
    if i % 5 == 4:
        fields["model"] = "opus"
    else:
        fields["system"] = json.dumps(SYSTEM_1H if kind == "reason" else SYSTEM_5M)
    return fields


def submit(client: redis.Redis, prefix: str, numbers: range) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for i in numbers:
        pipe.xadd(Keys(prefix).ingress, task(i))
    return [x.decode() for x in pipe.execute()]


def ledger_rows(redis_url: str, prefix: str) -> list[Row]:
    """Yesterday's and today's rows (a run may cross midnight UTC)."""

    async def read() -> list[Row]:
        client = AsyncRedis.from_url(redis_url)
        try:
            today = datetime.datetime.now(datetime.UTC).date()
            days = [today - datetime.timedelta(days=1), today]
            return (await read_days(client, Keys(prefix), days)).rows
        finally:
            await client.aclose()

    return asyncio.run(read())


def counted_ahead(client: redis.Redis, prefix: str) -> bool:
    """More tasks in today's ledger (its per-minute task counts) than completion events."""
    day = datetime.datetime.now(datetime.UTC).date().isoformat()
    minutes = client.hgetall(Keys(prefix).ledger(day))
    counted = sum(int(v) for k, v in minutes.items() if k.endswith(b"|tasks"))
    return counted > client.xlen(Keys(prefix).done) + 2


def total(rows: list[Row], family: str = "") -> Totals:
    out = Totals()
    for row in rows:
        if family in row.model:
            out.add(row.totals)
    return out


def assert_ledger_matches_the_api(rows: list[Row], fake: FakeClaudeServer) -> None:
    """Token for token what the fake API billed, and cost = tokens x price exactly."""
    stats = fake.stats()
    paid = total(rows)
    usage = stats["usage"]
    assert paid.requests == stats["succeeded"]
    assert paid.input == usage["input_tokens"]
    assert paid.output == usage["output_tokens"]
    assert paid.cache_read == usage["cache_read_input_tokens"] > 0
    assert paid.cache_write_5m + paid.cache_write_1h == usage["cache_creation_input_tokens"]
    # The 1-hour writes are the Sonnet lane's, the 5-minute ones Haiku's (see `task`).
    families = stats["by_key_family"]
    sonnet, haiku = total(rows, "sonnet"), total(rows, "haiku")
    assert sonnet.cache_write_1h == families["good-key|sonnet"]["cache_creation_input_tokens"] > 0
    assert sonnet.cache_write_5m == 0
    assert haiku.cache_write_5m == families["good-key|haiku"]["cache_creation_input_tokens"] > 0
    assert haiku.cache_write_1h == 0
    prices = PriceTable.from_settings(load_settings(env={}))
    for row in rows:
        rates = prices.on(row.day).rates(row.model)
        assert rates is not None
        t = row.totals
        exact = (
            t.input * rates.input
            + t.output * rates.output
            + t.cache_write_5m * rates.cache_write_5m
            + t.cache_write_1h * rates.cache_write_1h
            + t.cache_read * rates.cache_read
        )
        assert t.cost_pico == exact, row


def test_the_ledger_equals_the_api_usage_and_counts_cache_hits(
    pipeline_workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str,
    redis_url: str,
) -> None:  # fmt: skip
    pipeline_workers.start(args=["-n", "100"])
    ids = submit(rclient, prefix, range(300))
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 300, 120, what="300 results")
    # The first 100 again: complete answers now come from the response cache.
    again = submit(rclient, prefix, range(100))
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 400, 60, what="100 more results")
    t = tally(rclient, prefix)
    t.assert_exactly_once(ids + again)
    assert t.completed() == 400
    rows = ledger_rows(redis_url, prefix)
    assert_ledger_matches_the_api(rows, fake)
    results = [rclient.hgetall(Keys(prefix).result(i)) for i in again]
    hits = [r for r in results if r[b"cached"] == b"true"]
    everything = total(rows)
    assert everything.hits == len(hits) > 50
    assert everything.requests + everything.hits == 400
    assert {r[b"cost_usd"] for r in hits} == {b"0.000000"}
    prices = PriceTable.from_settings(load_settings(env={}))
    assert everything.saved_pico == sum(
        prices.cost_pico(r[b"model"].decode(), usage_of(r)) for r in hits
    )
    # Spend vs the all-Sonnet baseline: Haiku lanes save, explicit Opus is its own baseline.
    assert everything.baseline_pico > everything.cost_pico + everything.saved_pico
    opus = total(rows, "opus")
    assert opus.baseline_pico == opus.cost_pico + opus.saved_pico
    # The results' own costs add up to the ledger's (each rounded to a micro-dollar).
    spent_micro = sum(round(float(r[b"cost_usd"]) * 1e6) for r in map(
        lambda i: rclient.hgetall(Keys(prefix).result(i)), ids + again))  # fmt: skip
    assert abs(spent_micro * 1_000_000 - everything.cost_pico) <= 400 * 500_000


def usage_of(result: dict[bytes, bytes]) -> Usage:
    """A result's usage; its cache writes are 1-hour ones on Sonnet (see `task`)."""
    written = int(result[b"cache_creation_input_tokens"])
    return Usage(
        input_tokens=int(result[b"input_tokens"]),
        output_tokens=int(result[b"output_tokens"]),
        cache_read_input_tokens=int(result[b"cache_read_input_tokens"]),
        cache_creation_input_tokens=written,
        cache_creation_1h_input_tokens=written if b"sonnet" in result[b"model"] else 0,
    )


def test_a_killed_store_worker_does_not_count_a_task_twice(
    pipeline_workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str,
    redis_url: str,
) -> None:  # fmt: skip
    pipeline_workers.start(["cache-check", "router", "claude-call"], args=["-n", "200"])
    ids = submit(rclient, prefix, range(1000, 1600))
    store = Keys(prefix).stream("store")
    wait_until(lambda: rclient.xlen(store) >= 600, 120, what="600 answers waiting for the store")
    # Kill the store while it has counted more tasks than it has handed off.
    victim = pipeline_workers.start(["store"], args=["-n", "4", "--consumer", "victim"])
    wait_until(lambda: counted_ahead(rclient, prefix), 60, every=0.001, what="counted, not done")
    victim.kill()
    assert rclient.xlen(Keys(prefix).done) < 600
    pipeline_workers.start(["store"], args=["-n", "200"])
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 600, 120, what="all 600 results")
    t = tally(rclient, prefix)
    t.assert_exactly_once(ids)
    assert t.completed() == 600
    assert fake.stats()["max_calls_per_request"] == 1
    rows = ledger_rows(redis_url, prefix)
    assert total(rows).requests == 600
    assert_ledger_matches_the_api(rows, fake)
