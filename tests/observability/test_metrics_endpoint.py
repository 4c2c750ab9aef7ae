"""A real worker subprocess serves Prometheus metrics that match what the test put in Redis.

The worker runs the four real stages against the fake Claude API (`--metrics-port 0`: any free
port, read from its log). The test parks entries in a stage nobody runs (backlog, pending,
lag), sends invalid tasks (DLQ) and duplicate tasks (cache hits), then scrapes and parses the
endpoint with prometheus_client's own parser.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import redis

from pipeline import App, Message, Outcome, Settings, Stage
from pipeline.fake_claude import FakeClaudeServer
from pipeline.runtime.keys import Keys
from stages import app as real_stages
from tests.conftest import StartFake
from tests.helpers.workers import Workers, wait_until

PARKED = "parked"


async def _never(msg: Message) -> Outcome:
    raise AssertionError("no worker runs the parked stage")


def app(settings: Settings) -> App:
    """The real pipeline plus a stage the test's worker does not run."""
    return App([*real_stages(settings).stages, Stage(PARKED, PARKED, handler=_never)])


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float | None:  # fmt: skip
    wanted = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and wanted <= ls]
    return sum(found) if found else None


def test_prometheus_endpoint_reports_backlog_dlq_and_cache_hits(
    fast_env: dict[str, str], start_fake: StartFake, rclient: redis.Redis, prefix: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    fake = start_fake()
    env = {**fast_env, "ANTHROPIC_BASE_URL": fake.base_url, "ANTHROPIC_API_KEY": "test-key",
           "PIPELINE_METRICS__POLL_S": "0.2"}  # fmt: skip
    workers = Workers(env, tmp_path, app="tests.observability.test_metrics_endpoint:app")
    try:
        run(workers, fake, rclient, prefix)
    finally:
        workers.stop_all()


def run(workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    stages = ("cache-check", "router", "claude-call", "store")
    worker = workers.start(stages, args=["--metrics-port", "0"])
    found: list[int] = []

    def port_logged() -> bool:
        match = re.search(r"scrape http://[^:]+:(\d+)/metrics", worker.log())
        if match:
            found.append(int(match.group(1)))
        assert worker.proc.poll() is None, worker.log()
        return bool(match)

    wait_until(port_logged, 30, what="the metrics port in the worker's log")
    port = found[0]

    # Backlog: 7 entries parked in a stream whose group has read 3 of them (pending 3, lag 4).
    parked = keys.stream(PARKED)
    for i in range(7):
        rclient.xadd(parked, {"prompt": f"parked {i}"})
    rclient.xgroup_create(parked, PARKED, id="0")
    rclient.xreadgroup(PARKED, "someone", {parked: ">"}, count=3)
    # DLQ: 4 tasks without a prompt, dead-lettered by cache-check.
    for i in range(4):
        rclient.xadd(keys.ingress, {"type": "classify", "n": str(i)})
    # Cache: one task answered by the fake API, then 5 identical ones answered from the cache.
    task = {"prompt": "What is 2+2?", "type": "classify"}  # answered in full: cached
    first = rclient.xadd(keys.ingress, task).decode()
    wait_until(lambda: rclient.hget(keys.result(first), "status") == b"completed", 30,
               what="the first task's result")  # fmt: skip
    repeats = [rclient.xadd(keys.ingress, task).decode() for _ in range(5)]
    wait_until(
        lambda: all(rclient.hget(keys.result(r), "cached") == b"true" for r in repeats),
        30, what="five cached results",
    )  # fmt: skip

    expected = {
        ("pipeline_stream_backlog", (("stage", PARKED), ("lane", ""))): 7,
        ("pipeline_stream_pending", (("stage", PARKED), ("lane", ""))): 3,
        ("pipeline_stream_lag", (("stage", PARKED), ("lane", ""))): 4,
        ("pipeline_stream_backlog", (("stage", "cache-check"), ("lane", ""))): 0,
        ("pipeline_dlq_size", ()): 4,
        ("pipeline_cache_hits_total", ()): 5,
        ("pipeline_cache_misses_total", ()): 1,
        ("pipeline_stage_handled_total", (("stage", "cache-check"), ("outcome", "dead_letter"))): 4,
        ("pipeline_stage_handled_total", (("stage", "store"), ("outcome", "complete"))): 6,
        ("pipeline_task_latency_seconds_count", ()): 6,
        ("pipeline_claude_responses_total", (("status", "200"),)): 1,
        ("gen_ai_client_operation_duration_seconds_count", ()): 1,
        ("gen_ai_client_token_usage_count", (("gen_ai_token_type", "output"),)): 1,
    }
    got: dict[tuple[str, tuple[tuple[str, str], ...]], float | None] = {}

    def matches() -> bool:
        samples = scrape(port)
        got.update({(n, ls): value(samples, n, **dict(ls)) for n, ls in expected})
        return got == expected

    try:
        wait_until(matches, 15, every=0.2, what="the scraped metrics")
    except AssertionError:
        raise AssertionError(f"scraped {got}\nexpected {expected}") from None
    samples = scrape(port)
    assert (value(samples, "pipeline_stream_oldest_pending_age_seconds", stage=PARKED) or 0) > 0
    assert (value(samples, "pipeline_cost_usd_total", type="classify") or 0) > 0
    assert fake.stats()["requests_total"] == 1
