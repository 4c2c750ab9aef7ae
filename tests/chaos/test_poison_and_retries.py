"""The "Poison is contained" and "Retries are durable" guarantees: poison goes to the DLQ at
once; retries are durable and bounded."""

from __future__ import annotations

import pytest
import redis

from pipeline.runtime.keys import Keys
from pipeline.runtime.wire import ENVELOPE_FIELD
from tests.chaos.test_crash_recovery import STAGES, STREAMS, submit
from tests.helpers.outcomes import assert_drained, tally
from tests.helpers.workers import Workers, wait_until

pytestmark = pytest.mark.chaos


def dlq_by_task(client: redis.Redis, prefix: str) -> dict[str, dict[str, str]]:
    out = {}
    for _id, fields in client.xrange(Keys(prefix).dlq):
        row = {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
        out[row["task_id"]] = row
    return out


def test_poison_entries_go_to_the_dlq_with_a_reason_and_the_worker_keeps_going(
    workers: Workers, rclient: redis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    w = workers.start()
    garbage = rclient.xadd(keys.ingress, {ENVELOPE_FIELD: b"\xff\x00not msgpack"}).decode()
    missing = rclient.xadd(keys.ingress, {"m": "no n here"}).decode()
    huge = rclient.xadd(keys.ingress, {"n": "1", "blob": "x" * (10 * 1024 * 1024)}).decode()
    not_utf8 = rclient.xadd(keys.ingress, {"n": b"\xff\xfe"}).decode()
    good = submit(rclient, prefix, 3)
    wait_until(lambda: rclient.xlen(keys.done) >= 7, 20, what="7 outcomes")
    dlq = dlq_by_task(rclient, prefix)
    assert "undecodable envelope" in dlq[garbage]["error"]
    assert "missing field 'n'" in dlq[missing]["error"]
    assert "over the" in dlq[huge]["error"] and "byte limit" in dlq[huge]["error"]
    assert "not valid UTF-8" in dlq[not_utf8]["error"]
    assert dlq[missing]["stage"] == "ingest" and dlq[missing]["fields"] == '{"m": "no n here"}'
    assert len(dlq[huge]["fields"]) < 100 * 1024, "the DLQ copy of a 10 MB field must be cut"
    for task_id in (garbage, missing, huge, not_utf8):
        result = rclient.hgetall(keys.result(task_id))
        assert result[b"status"] == b"failed" and result[b"error"], result
    t = tally(rclient, prefix, STAGES)
    t.assert_exactly_once([garbage, missing, huge, not_utf8, *good])
    assert t.completed() == 3
    assert w.proc.poll() is None, "the worker died on poison"
    assert_drained(rclient, prefix, STREAMS)


def test_a_handler_that_always_fails_is_dead_lettered_after_max_attempts(
    workers: Workers, rclient: redis.Redis, prefix: str
) -> None:
    workers.env["PIPELINE_RETRY__MAX_ATTEMPTS"] = "3"
    workers.start(extra_env={"TEST_FAIL": "always"})
    ids = submit(rclient, prefix, 5)
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 5, 30, what="5 failures")
    dlq = dlq_by_task(rclient, prefix)
    t = tally(rclient, prefix, STAGES)
    t.assert_exactly_once(ids)
    for i in ids:
        assert "gave up after 3 attempts" in dlq[i]["error"]
        assert "RuntimeError: boom on attempt 3" in dlq[i]["error"]
        assert dlq[i]["stage"] == "work" and dlq[i]["attempts"] == "3"
        assert t.runs["work"][i] == 3
    assert_drained(rclient, prefix, STREAMS)


def test_transient_failures_are_retried_then_complete(
    workers: Workers, rclient: redis.Redis, prefix: str
) -> None:
    workers.start(extra_env={"TEST_FAIL_TIMES": "2"})
    ids = submit(rclient, prefix, 20)
    wait_until(lambda: rclient.xlen(Keys(prefix).done) >= 20, 30, what="20 completions")
    t = tally(rclient, prefix, STAGES)
    t.assert_exactly_once(ids)
    assert t.completed() == 20
    assert all(t.runs["work"][i] == 3 for i in ids)
    assert_drained(rclient, prefix, STREAMS)


def test_entries_past_max_deliveries_are_dead_lettered(
    workers: Workers, rclient: redis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    rclient.xgroup_create(keys.ingress, "ingest", id="0", mkstream=True)
    ids = submit(rclient, prefix, 3)
    rclient.xreadgroup("ingest", "ghost", {keys.ingress: ">"})
    # as if delivered to crashing workers 9 times: count 9, idle long past any lease
    rclient.xclaim(keys.ingress, "ingest", "ghost", 0, ids, idle=600_000, retrycount=9)
    workers.start()
    wait_until(lambda: rclient.xlen(keys.done) >= 3, 20, what="3 dead letters")
    dlq = dlq_by_task(rclient, prefix)
    for i in ids:
        assert "delivered 10 times (max_deliveries=5)" in dlq[i]["error"], dlq[i]
        assert dlq[i]["deliveries"] == "10"
    tally(rclient, prefix, STAGES).assert_exactly_once(ids)
    assert_drained(rclient, prefix, STREAMS)


def test_a_retry_survives_the_worker_being_killed_during_its_backoff(
    workers: Workers, rclient: redis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    workers.start(["ingest", "finish"])
    a = workers.start(["work"], extra_env={"TEST_FAIL_TIMES": "1", "TEST_RETRY_AFTER_S": "3"})
    ids = submit(rclient, prefix, 10)
    delayed = keys.delayed(keys.stream("work"))
    wait_until(lambda: rclient.zcard(delayed) == 10, 20, what="10 entries in the delayed set")
    a.kill()
    workers.start(["work"], extra_env={"TEST_FAIL_TIMES": "1"})
    wait_until(lambda: rclient.xlen(keys.done) >= 10, 20, what="10 completions")
    t = tally(rclient, prefix, STAGES)
    t.assert_exactly_once(ids)
    assert t.completed() == 10 and all(t.runs["work"][i] == 2 for i in ids)
    assert_drained(rclient, prefix, STREAMS)
