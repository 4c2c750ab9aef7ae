"""Sentinel-managed primaries (`redis+sentinel://`, `pipeline.runtime.redis_sentinel`): the
workers, the CLI's client and the producer `Client` reach the primary the sentinels name,
and follow it when the sentinels promote its replica."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeline.client import Client
from pipeline.runtime.errors import ConfigError
from pipeline.runtime.keys import Keys
from pipeline.runtime.redis_conn import Availability, connect, node_client
from pipeline.runtime.redis_sentinel import parse
from pipeline.runtime.replication import Replication
from pipeline.runtime.settings import RedisSettings
from tests.conftest import FAST, StartFake
from tests.helpers.redis_sentinel import LocalSentinels
from tests.helpers.workers import Workers, wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[LocalSentinels]:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server for a primary, a replica and sentinels")
    group = LocalSentinels(tmp_path / "sentinel").start()
    yield group
    group.stop()


def test_the_url_names_sentinels_a_service_and_credentials() -> None:
    target = parse("rediss+sentinel://app:s%40cret@10.0.0.1:26379,[::1]:26380/orders/2"
                   "?sentinel_password=sp&ssl_ca_certs=/ca.pem")  # fmt: skip
    assert target.sentinels == [("10.0.0.1", 26379), ("::1", 26380)]
    assert (target.service, target.db, target.username, target.password) == (
        "orders", 2, "app", "s@cret",
    )  # fmt: skip
    assert target.tls and target.sentinel_auth == {"password": "sp"}
    assert target.tls_options == {"ssl_ca_certs": "/ca.pem"}
    for bad in ("redis+sentinel://h:1", "redis+sentinel://h/svc", "redis+sentinel://h:1/s/x",
                "redis+sentinel://h:1/s?colour=blue"):  # fmt: skip
        with pytest.raises(ConfigError, match=r"redis\.url"):
            parse(bad)


@pytest.mark.anyio
async def test_a_client_follows_the_primary_the_sentinels_promote(
    sentinels: LocalSentinels,
) -> None:
    client = node_client(sentinels.url, max_connections=4, pool_timeout=None)
    try:
        await client.set("s:k", "before")
        sentinels.wait_replica_synced()
        new = sentinels.kill_primary()
        sentinels.wait_primary(new)
        for _ in range(50):  # the first commands meet the dead primary's closed connections
            try:
                assert await client.get("s:k") == b"before"
                break
            except redis.ConnectionError:
                await asyncio.sleep(0.2)
        await client.set("s:k", "after")
        with redis.Redis(port=new) as promoted:
            assert promoted.get("s:k") == b"after"
    finally:
        await client.aclose()


def test_workers_and_producers_carry_on_through_a_sentinel_failover(
    sentinels: LocalSentinels, start_fake: StartFake, tmp_path: Path
) -> None:
    """Tasks submitted with `Client` through the sentinels, four stages on a worker given
    only the sentinel URL; the primary is SIGKILLed once results land, the sentinels promote
    the replica, and every task (those before and after) ends completed with one paid call
    each but for calls the failover cut off."""
    fake = start_fake(latency_ms=100)
    prefix = f"s{uuid.uuid4().hex[:8]}"
    env = {"REDIS_URL": sentinels.url, "PIPELINE_PREFIX": prefix, **FAST,
           "PIPELINE_RUNTIME__LEASE_MS": "10000",
           "ANTHROPIC_BASE_URL": fake.base_url, "ANTHROPIC_API_KEY": "good-key"}  # fmt: skip
    workers = Workers(env, tmp_path, app="stages:app")
    keys = Keys(prefix)

    async def submit(ids: list[str]) -> None:
        async with Client(sentinels.url, prefix) as client:
            for task_id in ids:
                await client.submit(f"sentinel job {task_id}", id=task_id, model="haiku")

    async def results(ids: list[str]) -> dict[str, dict[str, str] | None]:
        async with Client(sentinels.url, prefix) as client:
            return {task_id: await client.result(task_id, wait=60) for task_id in ids}

    try:
        workers.start()
        first = [f"a-{i}" for i in range(100)]
        asyncio.run(submit(first))
        sentinels.wait_replica_synced()  # what the producer sent is safe (as WAIT would)
        primary = redis.Redis(port=sentinels.primary)
        wait_until(lambda: any(primary.exists(keys.result(t)) for t in first), 60, 0.1,
                   what="the first results")  # fmt: skip
        primary.close()
        new = sentinels.kill_primary()
        sentinels.wait_primary(new)
        second = [f"b-{i}" for i in range(100)]
        asyncio.run(submit(second))
        found = asyncio.run(results(first + second))
        missing = [t for t, r in found.items() if r is None]
        assert not missing, missing[:5]
        assert {r["status"] for r in found.values() if r} == {"completed"}
        paid = fake.stats()["succeeded"]
        assert 200 <= paid <= 200 + 64, paid  # at most one worker's calls in flight again
        status = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "status", "--json"],
            env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
    finally:
        workers.stop_all()


@pytest.mark.anyio
async def test_replicated_durability_writes_again_across_a_sentinel_failover(
    sentinels: LocalSentinels,
) -> None:
    """A write whose primary the sentinels replaced before a replica confirmed it may be
    lost with it: `Replication.write` makes it again on the new primary."""
    settings = RedisSettings(url=sentinels.url, durability="replicated", replica_timeout_ms=300)
    client = connect(settings)
    replication = Replication(client, "s", settings, Availability(settings.url))
    tries = 0

    async def write() -> int:
        nonlocal tries
        tries += 1
        await client.incr("s:n")
        if tries == 1:  # the primary goes before a replica is asked
            sentinels.wait_replica_synced()
            sentinels.wait_primary(sentinels.kill_primary())
        return tries

    try:
        await client.ping()  # connected, as a worker is (the pool knows the primary)
        assert await replication.write(write, "s:n") == 2
        assert replication.rewrites == 1
        assert await replication.write(write, "s:n") == 3  # the same primary: once
        assert replication.rewrites == 1
    finally:
        await client.aclose()
