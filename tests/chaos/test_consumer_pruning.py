"""Dead consumer names are forgotten; names that hold entries, and live workers, are kept."""

from __future__ import annotations

import time

import pytest
import redis

from pipeline.runtime.keys import Keys
from tests.helpers.workers import Workers, wait_until

pytestmark = pytest.mark.chaos


def names(client: redis.Redis, stream: str, group: str) -> set[str]:
    return {c["name"].decode() for c in client.xinfo_consumers(stream, group)}


def test_idle_names_with_nothing_pending_are_pruned(
    workers: Workers, rclient: redis.Redis, prefix: str
) -> None:
    stream = Keys(prefix).ingress
    rclient.xadd(stream, {"n": "1"})
    rclient.xgroup_create(stream, "ingest", id="0")
    rclient.xreadgroup("ingest", "ghost-holding", {stream: ">"}, count=1)  # stays pending
    rclient.xgroup_createconsumer(stream, "ingest", "ghost-empty")
    env = {"PIPELINE_RUNTIME__PRUNE_IDLE_MS": "1500", "PIPELINE_RUNTIME__LEASE_MS": "60000"}
    live = workers.start(["ingest"], extra_env=env, args=["--consumer", "live-one"])
    wait_until(lambda: names(rclient, stream, "ingest") == {"ghost-holding"}, 20,
               what="the empty idle name to be pruned, the holding one kept")  # fmt: skip
    assert "forgot 1 idle consumer names" in live.log()
    # The live worker's own name exists once it has read something, and survives: it reads
    # every block_ms, so it is never idle for prune_idle_ms.
    rclient.xadd(stream, {"n": "2"})
    wait_until(lambda: "live-one" in names(rclient, stream, "ingest"), 10, what="live-one")
    time.sleep(3.5)  # more than two prune intervals past prune_idle_ms
    assert names(rclient, stream, "ingest") == {"ghost-holding", "live-one"}
