"""The "Shutdown is clean" guarantee: losing Redis for a while is waited out; nothing is lost or
done twice."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from pipeline.runtime.keys import Keys
from tests.chaos.test_crash_recovery import STAGES, STREAMS
from tests.conftest import FAST
from tests.helpers.outcomes import assert_drained, tally
from tests.helpers.redis_server import RedisServer
from tests.helpers.workers import Workers, wait_until

pytestmark = pytest.mark.chaos


def test_workers_ride_out_a_redis_restart(
    private_redis: RedisServer, prefix: str, tmp_path: Path
) -> None:
    env = {"REDIS_URL": private_redis.url, "PIPELINE_PREFIX": prefix, **FAST}
    workers = Workers(env, tmp_path)
    client = redis.Redis.from_url(private_redis.url)
    keys = Keys(prefix)
    try:
        procs = [workers.start(extra_env={"TEST_SLOW_S": "0.02"}) for _ in range(2)]
        pipe = client.pipeline()
        for i in range(400):
            pipe.xadd(keys.ingress, {"n": str(i)})
        ids = [x.decode() for x in pipe.execute()]
        wait_until(lambda: client.xlen(keys.done) >= 50, 30, what="the run to be under way")
        private_redis.restart(down_s=2.0)  # SIGKILL; appendonly (fsync always) keeps the data
        client = redis.Redis.from_url(private_redis.url)
        wait_until(lambda: client.xlen(keys.done) >= 400, 60, what="all 400 to finish")
        time.sleep(0.5)
        t = tally(client, prefix, STAGES)
        t.assert_exactly_once(ids)
        assert t.completed() == 400
        assert all(p.proc.poll() is None for p in procs), "a worker died with Redis"
        # "redis back" is said once Redis has stayed up a moment (SETTLE_S), not at once.
        wait_until(lambda: all("redis back" in p.log() for p in procs), 15,
                   what="each worker to say Redis is back")  # fmt: skip
        for p in procs:
            log = p.log()
            assert "redis unavailable" in log and "redis back" in log, log[-2000:]
            assert log.count("redis unavailable") <= 3, "one line per outage, not per message"
        assert_drained(client, prefix, STREAMS)
    finally:
        workers.stop_all()
        client.close()


def test_sigterm_while_redis_is_down_still_exits(
    private_redis: RedisServer, prefix: str, tmp_path: Path
) -> None:
    env = {"REDIS_URL": private_redis.url, "PIPELINE_PREFIX": prefix, **FAST}
    workers = Workers(env, tmp_path)
    client = redis.Redis.from_url(private_redis.url)
    try:
        w = workers.start(extra_env={"TEST_SLOW_S": "30"})
        client.xadd(Keys(prefix).ingress, {"n": "1"})
        wait_until(lambda: "running" in w.log(), 10, what="worker up")
        time.sleep(1.0)
        private_redis.kill()
        time.sleep(1.0)
        w.signal(15)
        started = time.monotonic()
        assert w.wait(30) == 0
        assert time.monotonic() - started < 5 + 10 + 3  # grace + the watchdog's margin
        assert "exiting, held entries will be reclaimed" in w.log()
        private_redis.start()
        client = redis.Redis.from_url(private_redis.url)
        assert client.xlen(Keys(prefix).ingress) + client.xlen(Keys(prefix).stream("work")) >= 1
    finally:
        workers.stop_all()
        client.close()
