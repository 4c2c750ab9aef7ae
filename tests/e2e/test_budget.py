"""Budgets through all four stages, with worker subprocesses and the fake Claude API.

Each task asks Sonnet ($3/$15 per MTok) for up to 300 tokens about a ~30-character prompt:
its reservation is ~4,536 micro-USD (12 input tokens estimated, 300 output), on Haiku
($1/$5) ~1,512. What was really spent is counted from the fake API's own usage totals.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from pipeline.fake_claude import FakeClaudeConfig, FakeClaudeServer, run_fake_claude_in_thread
from pipeline.runtime.keys import Keys
from tests.helpers.outcomes import tally
from tests.helpers.workers import Workers, wait_until

pytestmark = pytest.mark.chaos
KEY = "good-key"
PRICES = {"sonnet": (3, 15), "haiku": (1, 5)}  # micro-USD per input / output token
WORST = 12 * 3 + 300 * 15


@pytest.fixture
def fake() -> Iterator[FakeClaudeServer]:
    # Limits the fake reports in headers, so the rate limiter learns them after one call
    # (none of them binds here).
    config = FakeClaudeConfig(latency_ms=300, rpm=100_000, itpm=10**8, otpm=10**8, seed=5)
    with run_fake_claude_in_thread(config) as server:
        yield server


Start = Callable[..., Workers]


@pytest.fixture
def start(fast_env: dict[str, str], fake: FakeClaudeServer, tmp_path: Path) -> Iterator[Start]:
    """`start(claude_call_workers, **budget env)`: the four stages under that budget."""
    started: list[Workers] = []

    def run(claude_call_workers: int = 1, **budget: str) -> Workers:
        env = {
            **fast_env,
            "ANTHROPIC_BASE_URL": fake.base_url,
            "ANTHROPIC_API_KEY": KEY,
            **{f"PIPELINE_BUDGET__{name.upper()}": value for name, value in budget.items()},
        }
        workers = Workers(env, tmp_path, app="stages:app")
        started.append(workers)
        workers.start(["cache-check", "router", "store"])
        for _ in range(claude_call_workers):
            workers.start(["claude-call"])
        return workers

    yield run
    for workers in started:
        workers.stop_all()


def submit(client: redis.Redis, prefix: str, n: int) -> list[str]:
    ids = [f"b{i}" for i in range(n)]
    pipe = client.pipeline(transaction=False)
    for i, task_id in enumerate(ids):
        prompt = f"task number {i:03}: say something"
        pipe.xadd(Keys(prefix).ingress, {"id": task_id, "model": "sonnet", "max_tokens": "300",
                                         "prompt": prompt})  # fmt: skip
    pipe.execute()
    return ids


def spent_micro_usd(fake: FakeClaudeServer) -> int:
    """What the fake API billed, by its own token counts."""
    total = 0
    for key_family, counters in fake.stats()["by_key_family"].items():
        price_in, price_out = PRICES[key_family.split("|")[1]]
        total += counters.get("input_tokens", 0) * price_in
        total += counters.get("output_tokens", 0) * price_out
    return total


def results(client: redis.Redis, prefix: str, ids: list[str]) -> dict[str, dict[str, str]]:
    out = {}
    for task_id in ids:
        raw = client.hgetall(Keys(prefix).result(task_id))
        out[task_id] = {k.decode(): v.decode() for k, v in raw.items()}
    return out


def test_concurrent_workers_never_overshoot_and_fail_the_rest_clearly(
    start: Start, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    budget = 50_000  # $0.05: room for ~11 worst cases, ~20 real calls
    start(3, daily_usd="0.05", action="fail")
    ids = submit(rclient, prefix, 80)
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 80, 60, what="80 results")
    tally(rclient, prefix).assert_exactly_once(ids)

    spent = spent_micro_usd(fake)
    assert spent <= budget + WORST, f"spent {spent} micro-USD on a {budget} budget"
    stats = fake.stats()
    assert stats["inflight_max"] >= 3, "the workers never called at the same time"
    by_status = results(rclient, prefix, ids)
    completed = [t for t, r in by_status.items() if r["status"] == "completed"]
    failed = [r["error"] for r in by_status.values() if r["status"] == "failed"]
    assert len(completed) == stats["succeeded"] >= 8
    assert failed, "the budget should have run out"
    assert all(e.startswith("daily budget $0.05 reached (spent $0.0") for e in failed), failed[0]
    print(f"spent {spent} of {budget} micro-USD in {len(completed)} calls; {len(failed)} failed")


def test_deferred_tasks_come_back_when_the_window_rolls_without_spending_attempts(
    start: Start, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    """A 3-second 'day' with room for one call: three tasks take three windows."""
    start(1, daily_usd="0.0048", action="defer", period_s="3")
    began = time.monotonic()
    ids = submit(rclient, prefix, 3)
    delayed = Keys(prefix).delayed(Keys(prefix).stream("call", "sonnet"))
    wait_until(lambda: rclient.zcard(delayed) > 0, 30, what="a task deferred")
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 3, 30, what="3 results")
    took = time.monotonic() - began
    tally(rclient, prefix).assert_exactly_once(ids)
    by_status = results(rclient, prefix, ids)
    assert all(r["status"] == "completed" and r["attempts"] == "1" for r in by_status.values())
    assert fake.stats()["succeeded"] == 3
    assert took > 3, f"three windows' worth of calls finished in {took:.1f}s"


def test_downgrade_sends_the_calls_to_haiku(
    start: Start, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    start(1, daily_usd="0.0045", action="downgrade", downgrade_to="haiku")  # < one Sonnet call
    ids = submit(rclient, prefix, 2)
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 2, 30, what="2 results")
    by_status = results(rclient, prefix, ids)
    assert {r["status"] for r in by_status.values()} == {"completed"}
    assert {r["model"] for r in by_status.values()} == {"claude-haiku-5-5"}
    assert list(fake.stats()["by_key_family"]) == [f"{KEY}|haiku"]
