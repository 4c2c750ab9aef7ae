"""Replicated durability (`pipeline.runtime.replication`): a write counts once a replica of
the primary that took it holds it. A failover between the write and the confirmation would
let a `WAIT` on the promoted replica (which may never have had the write) confirm nothing
but itself: the write is made again."""

from __future__ import annotations

import uuid

import pytest
from redis.asyncio import RedisCluster

from pipeline.runtime.redis_conn import Availability, connect_cluster
from pipeline.runtime.replication import Replication
from pipeline.runtime.settings import RedisSettings
from tests.helpers.redis_cluster import LocalRedisCluster

pytestmark = pytest.mark.anyio


async def test_a_write_whose_primary_changed_before_confirmation_is_made_again(
    private_redis_cluster: LocalRedisCluster,
) -> None:
    cluster = private_redis_cluster
    settings = RedisSettings(url=cluster.url, durability="replicated", replica_timeout_ms=2000)
    redis: RedisCluster = connect_cluster(settings)
    await redis.initialize()
    replication = Replication(redis, f"r{uuid.uuid4().hex[:6]}", settings,  # type: ignore[arg-type]
                              Availability(settings.url))  # fmt: skip
    key = "rep:{p0}:counter"
    tries: list[str] = []

    async def write() -> int:
        node = redis.get_node_from_key(key)
        assert node is not None
        tries.append(node.name)
        written = int(await redis.incr(key))
        if len(tries) == 1:  # the slot changes primary before a replica is asked
            cluster.fail_over(int(node.port))
        return written

    try:
        assert await replication.write(write, key) == 2
        assert replication.rewrites == 1
        assert tries[0] != tries[1], tries
        # Confirmed where it was written: a write on an unchanged primary is made once.
        assert await replication.write(write, key) == 3
        assert replication.rewrites == 1 and len(tries) == 3
    finally:
        await replication.aclose()
        await redis.aclose()


async def test_acknowledged_durability_writes_once_and_asks_nobody(
    private_redis_cluster: LocalRedisCluster,
) -> None:
    cluster = private_redis_cluster
    settings = RedisSettings(url=cluster.url)
    redis: RedisCluster = connect_cluster(settings)
    replication = Replication(redis, "r", settings, Availability(settings.url))  # type: ignore[arg-type]
    calls = 0

    async def write() -> int:
        nonlocal calls
        calls += 1
        return calls

    try:
        assert not replication.enabled
        assert await replication.write(write, "any") == 1
        assert replication.short == replication.rewrites == 0
    finally:
        await redis.aclose()
