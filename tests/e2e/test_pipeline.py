"""All four stages end to end, against the fake Claude API, with worker subprocesses.

Each test ends by counting: every task exactly one result (completed, or failed with exactly
one DLQ entry), and Claude called once per distinct uncached request.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeline.fake_claude import FakeClaudeConfig, FakeClaudeServer, run_fake_claude_in_thread
from pipeline.runtime.keys import Keys
from tests.helpers.outcomes import tally
from tests.helpers.workers import Workers, wait_until

pytestmark = pytest.mark.chaos
STREAMS = ("tasks", "route", "call:haiku", "call:sonnet", "call:opus", "store")


@pytest.fixture
def fake() -> Iterator[FakeClaudeServer]:
    config = FakeClaudeConfig(
        latency_ms=150, latency_sigma=0.5, latency_cap_ms=2000, overloaded_rate=0.05,
        rpm=6000, bad_keys=frozenset({"bad-key"}), seed=3,
    )  # fmt: skip
    with run_fake_claude_in_thread(config) as server:
        yield server


@pytest.fixture
def pipeline_workers(fast_env: dict[str, str], fake: FakeClaudeServer, tmp_path: Path
                     ) -> Iterator[Workers]:  # fmt: skip
    env = {
        **fast_env,
        "ANTHROPIC_BASE_URL": fake.base_url,
        "ANTHROPIC_API_KEY": "good-key",
        "PIPELINE_CLAUDE__AUTH_PAUSE_S": "2",
        "PIPELINE_RETRY__MAX_ATTEMPTS": "10",
    }
    w = Workers(env, tmp_path, app="stages:app")
    yield w
    w.stop_all()


def submit_unique(client: redis.Redis, prefix: str, n: int, start: int = 0) -> list[str]:
    kinds = ["classify", "extract", "summarise", "analyse"]
    pipe = client.pipeline(transaction=False)
    for i in range(start, start + n):
        pipe.xadd(Keys(prefix).ingress, {"prompt": f"task number {i}: say something",
                                         "type": kinds[i % 4], "max_tokens": "300"})  # fmt: skip
    return [x.decode() for x in pipe.execute()]


def held_by(client: redis.Redis, stream: str, consumer: str) -> int:
    try:
        info = client.xpending(stream, "claude-call")
    except redis.ResponseError:
        return 0
    return sum(int(c["pending"]) for c in info["consumers"] if c["name"] == consumer.encode())


def drained(client: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    for name in STREAMS:
        stream = keys.stream(name)
        if client.exists(stream):
            assert client.xlen(stream) == 0, f"{stream} holds {client.xlen(stream)}"
            for group in client.xinfo_groups(stream):
                assert group["pending"] == 0, f"{stream} has pending entries"


def test_a_thousand_tasks_through_all_four_stages_each_called_once(
    pipeline_workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    pipeline_workers.start(args=["-n", "200"])
    pipeline_workers.start(args=["-n", "200"])
    ids = submit_unique(rclient, prefix, 1000)
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 1000, 120, what="1000 results")
    t = tally(rclient, prefix)
    t.assert_exactly_once(ids)
    assert t.completed() == 1000, {k: v for k, v in t.statuses.items() if v != "completed"}
    stats = fake.stats()
    assert stats["by_status"].get("529", 0) > 0, "the fake injected no overloads"
    assert stats["distinct_requests"] == 1000
    assert stats["max_calls_per_request"] == 1, "a request was paid for twice"
    # The same requests again: complete answers come from the cache with no new call;
    # answers cut at max_tokens were never cached, so those are called again.
    truncated = {
        i for i, task_id in enumerate(ids[:50])
        if rclient.hget(Keys(prefix).result(task_id), "stop_reason") != b"end_turn"
    }  # fmt: skip
    assert len(truncated) < 50
    again = submit_unique(rclient, prefix, 50)
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 1050, 60, what="50 more results")
    for i, task_id in enumerate(again):
        result = rclient.hgetall(Keys(prefix).result(task_id))
        assert result[b"status"] == b"completed"
        assert result[b"cached"] == (b"false" if i in truncated else b"true"), (i, result)
    assert fake.stats()["succeeded"] == stats["succeeded"] + len(truncated)
    drained(rclient, prefix)


def test_killing_a_claude_call_worker_mid_run_loses_nothing_and_pays_once(
    pipeline_workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    pipeline_workers.start(["cache-check", "router", "store"])
    victim = pipeline_workers.start(["claude-call"], args=["-n", "100", "--consumer", "victim"])
    pipeline_workers.start(["claude-call"], args=["-n", "100"])
    ids = submit_unique(rclient, prefix, 600)
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 150, 60, what="the run under way")
    victim.kill()
    held = sum(held_by(rclient, Keys(prefix).stream("call", lane), "victim")
               for lane in ("haiku", "sonnet", "opus"))  # fmt: skip
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 600, 120, what="all 600 results")
    t = tally(rclient, prefix)
    t.assert_exactly_once(ids)
    assert t.completed() == 600
    stats = fake.stats()
    assert stats["distinct_requests"] == 600
    paid_twice = stats["succeeded"] - stats["distinct_requests"]
    # Only calls that were in flight in the killed worker can be paid twice: their answers
    # died with it (cut off mid-call, or sent but never read). Every answer a worker read was
    # recorded before it was handed on, so no other task is ever called again.
    assert held > 0 and paid_twice <= held, (paid_twice, held, stats["client_gone"])
    assert stats["max_calls_per_request"] <= 2
    drained(rclient, prefix)


def test_bad_input_from_redis_cli_gets_failed_results_and_dlq_entries(
    pipeline_workers: Workers, rclient: redis.Redis, prefix: str, redis_url: str
) -> None:
    pipeline_workers.start()
    port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
    ingress = Keys(prefix).ingress
    cases = {
        "no-prompt": ["type", "classify"],
        "bad-json": ["messages", "[{not json"],
        "bad-max": ["prompt", "hi", "max_tokens", "-3"],
        "bad-model": ["prompt", "hi", "model", "gpt-4"],
        "good": ["prompt", "hello from redis-cli", "type", "classify"],
    }
    for task_id, fields in cases.items():
        cmd = ["redis-cli", "-p", str(port), "XADD", ingress, "*", "id", task_id, *fields]
        subprocess.run(cmd, check=True, capture_output=True)
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 5, 30, what="5 results")
    t = tally(rclient, prefix)
    t.assert_exactly_once(list(cases))
    assert t.statuses["good"] == "completed"
    dlq = {f[b"task_id"].decode(): f for _i, f in rclient.xrange(Keys(prefix).dlq)}
    assert set(dlq) == {"no-prompt", "bad-json", "bad-max", "bad-model"}
    assert b"prompt" in dlq["no-prompt"][b"error"]
    assert b"messages" in dlq["bad-json"][b"error"]
    assert b"max_tokens" in dlq["bad-max"][b"error"]
    assert b"unknown model" in dlq["bad-model"][b"error"]
    # A later stage's letter shows the fields carried that far; its error names the model,
    # and its entry (kept whole for replay) holds the parsed request.
    assert b"unknown model 'gpt-4'" in dlq["bad-model"][b"error"]
    assert json.loads(dlq["bad-model"][b"fields"])["id"] == "bad-model"
    for task_id in dlq:
        result = rclient.hgetall(Keys(prefix).result(task_id))
        assert result[b"status"] == b"failed" and result[b"error"] == dlq[task_id][b"error"]
    drained(rclient, prefix)


def test_an_invalid_api_key_pauses_the_stage_and_it_resumes_when_fixed(
    pipeline_workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    fake.update_config(bad_keys=frozenset({"good-key"}))  # the key the workers use is refused
    w = pipeline_workers.start()
    ids = submit_unique(rclient, prefix, 20)
    wait_until(lambda: rclient.exists(Keys(prefix).pause("claude-call")), 20, what="a pause")
    time.sleep(3)  # more than one pause period: still nothing may be dead-lettered
    assert rclient.xlen(Keys(prefix).dlq) == 0
    assert rclient.xlen(Keys(prefix).done) == 0
    assert "PAUSED" in w.log() and "credentials refused" in w.log()
    fake.update_config(bad_keys=frozenset())
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 20, 30, what="resumed results")
    t = tally(rclient, prefix)
    t.assert_exactly_once(ids)
    assert t.completed() == 20
    assert fake.stats()["max_calls_per_request"] == 1
    drained(rclient, prefix)
