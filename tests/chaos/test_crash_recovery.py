"""The "Crashes are recovered fast" guarantee: a dead worker's entries move within the lease; a
live one's are never stolen."""

from __future__ import annotations

import signal
import time

import pytest
import redis

from pipeline.runtime.keys import Keys
from tests.helpers.outcomes import assert_drained, tally
from tests.helpers.workers import Workers, wait_until

pytestmark = pytest.mark.chaos
STAGES = ("ingest", "work", "finish")
STREAMS = ("tasks", "work", "finish")
LEASE_S = 3.0


def submit(client: redis.Redis, prefix: str, n: int) -> list[str]:
    pipe = client.pipeline()
    for i in range(n):
        pipe.xadd(Keys(prefix).ingress, {"n": str(i)})
    return [x.decode() for x in pipe.execute()]


def pending_of(client: redis.Redis, stream: str, group: str) -> dict[str, int]:
    try:
        info = client.xpending(stream, group)
    except redis.ResponseError:  # group not created yet
        return {}
    return {c["name"].decode(): int(c["pending"]) for c in info["consumers"]}


def test_sigkilled_worker_entries_are_reclaimed_within_lease(
    workers: Workers, rclient: redis.Redis, prefix: str
) -> None:
    workers.start(["ingest", "finish"])
    slow = {"TEST_SLOW_S": "6"}
    a = workers.start(["work"], extra_env=slow, args=["--consumer", "worker-a"])
    work = Keys(prefix).stream("work")
    ids = submit(rclient, prefix, 20)
    wait_until(lambda: pending_of(rclient, work, "work").get("worker-a", 0) == 20, 20,
               what="worker-a to hold all 20 entries")  # fmt: skip
    b = workers.start(["work"], extra_env=slow, args=["--consumer", "worker-b"])
    time.sleep(1.0)
    assert pending_of(rclient, work, "work").get("worker-b", 0) == 0, "b stole live entries"
    a.kill()
    took = wait_until(lambda: pending_of(rclient, work, "work").get("worker-a", 0) == 0,
                      LEASE_S + 10, what="worker-a's entries to be reclaimed")  # fmt: skip
    print(f"reclaim took {took:.2f}s after the kill (lease {LEASE_S}s)")
    assert took <= LEASE_S + 3, f"reclaim took {took:.1f}s, lease is {LEASE_S}s"
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 20, 30, what="20 completions")
    t = tally(rclient, prefix, STAGES)
    t.assert_exactly_once(ids)
    assert t.completed() == 20
    assert all(t.runs["finish"][i] == 1 for i in ids), "a task reached the last stage twice"
    assert all(rclient.hget(Keys(prefix).result(i), "worker") == str(b.pid).encode() for i in ids)
    assert "reclaimed 20 entries" in b.log() or "reclaimed" in b.log()
    assert_drained(rclient, prefix, STREAMS)


def test_live_worker_with_handler_three_times_the_lease_is_not_reclaimed(
    workers: Workers, rclient: redis.Redis, prefix: str
) -> None:
    workers.start(["ingest", "finish"])
    slow = {"TEST_SLOW_S": str(LEASE_S * 3)}
    a = workers.start(["work"], extra_env=slow, args=["--consumer", "worker-a"])
    work = Keys(prefix).stream("work")
    ids = submit(rclient, prefix, 5)
    wait_until(lambda: pending_of(rclient, work, "work").get("worker-a", 0) == 5, 20,
               what="worker-a to hold the entries")  # fmt: skip
    b = workers.start(["work"], extra_env=slow, args=["--consumer", "worker-b"])
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 5, LEASE_S * 3 + 15, what="completions")
    t = tally(rclient, prefix, STAGES)
    t.assert_exactly_once(ids)
    assert all(t.runs["work"][i] == 1 for i in ids), f"work ran twice: {t.runs['work']}"
    assert all(rclient.hget(Keys(prefix).result(i), "worker") == str(a.pid).encode() for i in ids)
    assert "reclaimed" not in b.log()
    assert_drained(rclient, prefix, STREAMS)


def test_restarted_worker_drains_its_own_pending_list_first(
    workers: Workers, rclient: redis.Redis, prefix: str
) -> None:
    workers.start(["ingest", "finish"])
    a = workers.start(["work"], extra_env={"TEST_SLOW_S": "30"}, args=["--consumer", "w"])
    work = Keys(prefix).stream("work")
    ids = submit(rclient, prefix, 10)
    wait_until(lambda: pending_of(rclient, work, "work").get("w", 0) == 10, 20, what="w to hold")
    a.kill()
    rclient.delete(Keys(prefix).worker("w"))  # as if its name lock had expired
    started = time.monotonic()
    again = workers.start(["work"], args=["--consumer", "w"])
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 10, 20, what="completions")
    assert time.monotonic() - started < LEASE_S, "restart waited for the lease instead of draining"
    assert "resumed 10 entries" in again.log()
    tally(rclient, prefix, STAGES).assert_exactly_once(ids)
    assert_drained(rclient, prefix, STREAMS)


def test_sigterm_finishes_in_flight_within_grace_and_exits_zero(
    workers: Workers, rclient: redis.Redis, prefix: str
) -> None:
    workers.start(["ingest", "finish"])
    a = workers.start(["work"], extra_env={"TEST_SLOW_S": "1.5"}, args=["-n", "4"])
    ids = submit(rclient, prefix, 30)
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 2, 20, what="first completions")
    a.signal(signal.SIGTERM)
    started = time.monotonic()
    assert a.wait(15) == 0
    assert time.monotonic() - started < 5 + 2  # grace 5 s, plus one blocked read
    assert "handed back" not in a.log()  # 1.5 s handlers all finished inside the grace period
    workers.start(["work"], args=["-n", "8"])
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 30, 30, what="all completions")
    t = tally(rclient, prefix, STAGES)
    t.assert_exactly_once(ids)
    assert all(t.runs["work"][i] == 1 for i in ids), "an entry finished at shutdown ran again"
    assert_drained(rclient, prefix, STREAMS)


def test_sigterm_hands_back_entries_that_outlive_the_grace_period(
    workers: Workers, rclient: redis.Redis, prefix: str
) -> None:
    workers.start(["ingest", "finish"])
    a = workers.start(["work"], extra_env={"TEST_SLOW_S": "60"}, args=["-n", "5"])
    work = Keys(prefix).stream("work")
    ids = submit(rclient, prefix, 5)
    wait_until(lambda: sum(pending_of(rclient, work, "work").values()) == 5, 20, what="held")
    a.signal(signal.SIGTERM)
    assert a.wait(15) == 0
    assert "handed back 5 unfinished entries" in a.log()
    started = time.monotonic()
    workers.start(["work"])
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 5, 20, what="completions")
    # handed back, not left to lapse: taken at the next reclaim, well inside one lease
    assert time.monotonic() - started < LEASE_S + 2
    tally(rclient, prefix, STAGES).assert_exactly_once(ids)
    assert_drained(rclient, prefix, STREAMS)
