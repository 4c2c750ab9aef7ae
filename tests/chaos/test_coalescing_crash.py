"""Coalescing through all four stages with worker subprocesses, and with the leader killed.

100 identical tasks at once make one Claude call; if the leader's worker is SIGKILLed mid-call,
its followers are not stranded: one of them calls again (the dead leader's call may have
reached the API too, so at most two), and every task still gets exactly one result.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeline.fake_claude import FakeClaudeConfig, FakeClaudeServer, run_fake_claude_in_thread
from pipeline.runtime.keys import Keys
from pipeline.runtime.wire import decode_entry
from tests.helpers.outcomes import assert_drained, tally
from tests.helpers.workers import WorkerProc, Workers, wait_until

pytestmark = pytest.mark.chaos
STREAMS = ("tasks", "route", "call:haiku", "call:sonnet", "call:opus", "store")
N = 100


@pytest.fixture
def fake() -> Iterator[FakeClaudeServer]:
    with run_fake_claude_in_thread(FakeClaudeConfig(latency_ms=4000)) as server:
        yield server


@pytest.fixture
def pipeline_workers(
    fast_env: dict[str, str], fake: FakeClaudeServer, tmp_path: Path
) -> Iterator[Workers]:
    env = {
        **fast_env,
        "ANTHROPIC_BASE_URL": fake.base_url,
        "ANTHROPIC_API_KEY": "good-key",
        # The rate limiter lets one call probe unknown limits, for this long: a prober that
        # died must not hold up the next leader for the default minute.
        "PIPELINE_RATELIMIT__PROBE_MS": "1000",
    }
    w = Workers(env, tmp_path, app="stages:app")
    yield w
    w.stop_all()


def submit_identical(client: redis.Redis, prefix: str) -> list[str]:
    ids = [f"same-{i}" for i in range(N)]
    pipe = client.pipeline(transaction=False)
    for task_id in ids:
        pipe.xadd(Keys(prefix).ingress, {"id": task_id, "prompt": "Name a prime number."})
    pipe.execute()
    return ids


def the_flight(client: redis.Redis, prefix: str) -> tuple[str, str] | None:
    """(flight key, leader's task id) of the one flight in progress, if any."""
    for key in client.scan_iter(match=Keys(prefix).flight("*", "*"), count=1000):
        if not key.endswith(b":answer") and (leader := client.get(key)):
            return key.decode(), leader.decode()
    return None


def holder_of(client: redis.Redis, prefix: str, task_id: str) -> str:
    """The claude-call consumer whose pending list holds `task_id`'s entry."""
    for lane in ("haiku", "sonnet", "opus"):
        stream = Keys(prefix).stream("call", lane)
        for pending in client.xpending_range(stream, "claude-call", "-", "+", 10 * N):
            entry_id = pending["message_id"]
            for _id, fields in client.xrange(stream, entry_id, entry_id):
                env = decode_entry(entry_id.decode(), fields, 1 << 22)
                if env.task_id == task_id:
                    return str(pending["consumer"].decode())
    raise AssertionError(f"no claude-call worker holds {task_id}")


def start(workers: Workers) -> dict[str, WorkerProc]:
    workers.start(["cache-check", "router", "store"])
    return {
        name: workers.start(["claude-call"], args=["--consumer", name])
        for name in ("call-a", "call-b")
    }


def finish(client: redis.Redis, prefix: str, ids: list[str]) -> int:
    """Wait for every result; check each task has exactly one; return how many coalesced."""
    wait_until(lambda: client.xlen(Keys(prefix).done) >= N, 60, what=f"{N} results")
    t = tally(client, prefix)
    t.assert_exactly_once(ids)
    assert t.completed() == N, {k: v for k, v in t.statuses.items() if v != "completed"}
    assert_drained(client, prefix, STREAMS)
    cached = [client.hget(Keys(prefix).result(i), "cached") for i in ids]
    return sum(1 for c in cached if c == b"true")


def test_a_hundred_identical_tasks_make_one_call(
    pipeline_workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    start(pipeline_workers)
    ids = submit_identical(rclient, prefix)
    assert finish(rclient, prefix, ids) == N - 1
    assert fake.stats()["requests_total"] == 1


def test_followers_outlive_a_sigkilled_leader(
    pipeline_workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    procs = start(pipeline_workers)
    ids = submit_identical(rclient, prefix)
    wait_until(lambda: fake.stats()["inflight"] == 1, 30, what="the leader's call")
    flight = the_flight(rclient, prefix)
    assert flight is not None, "the leader holds no flight"
    leader_worker = holder_of(rclient, prefix, flight[1])
    procs[leader_worker].kill()

    coalesced = finish(rclient, prefix, ids)
    # The dead leader's call reached the API; one follower had to call again, once.
    assert fake.stats()["requests_total"] == 2
    assert coalesced == N - 1, "every task but the new leader shares its answer"
    survivor = next(p for name, p in procs.items() if name != leader_worker)
    assert "reclaimed" in survivor.log(), "the dead leader's entries moved to the survivor"
