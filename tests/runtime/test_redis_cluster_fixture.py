"""The Redis Cluster fixtures (tests/helpers/redis_cluster.py) give what they promise.

- `redis_cluster`: every slot is served, by 3 primaries each with an in-sync replica; a write
  through a cluster client lands on the primary owning the key's slot, reaches its replica,
  and reads back through a cluster client entered at another node.
- `private_redis_cluster`: a SIGKILLed primary's replica takes over its slots, a key written
  (and replicated) before the kill is still there, and the killed node comes back a replica.
- `ExistingRedisCluster` (what `REDIS_CLUSTER_URL` gives) sees the same nodes and cannot kill.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from redis.crc import key_slot

from tests.helpers.redis_cluster import (
    SLOTS,
    ExistingRedisCluster,
    LocalRedisCluster,
    RedisClusterBase,
    info_fields,
    parse_cluster_nodes,
)


@pytest.fixture
def cluster_client(redis_cluster: RedisClusterBase) -> Iterator[redis.RedisCluster]:
    client = redis_cluster.client()
    yield client
    client.close()


@pytest.fixture
def key_prefix(cluster_client: redis.RedisCluster) -> Iterator[str]:
    """A prefix no other test uses; its keys are deleted afterwards, on every primary."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    for key in cluster_client.scan_iter(match=f"{name}:*", count=1000):
        cluster_client.delete(key)


def test_every_slot_is_served_by_three_primaries_each_with_a_replica(
    redis_cluster: RedisClusterBase, cluster_client: redis.RedisCluster
) -> None:
    nodes = redis_cluster.nodes
    primaries = [n for n in nodes if n.role == "primary"]
    replicas = [n for n in nodes if n.role == "replica"]
    assert len(primaries) >= 3 and len(replicas) >= len(primaries)
    assert all(n.port > 0 and not n.failed for n in nodes)
    covered = sorted(r for p in primaries for r in p.slots)
    assert covered[0][0] == 0 and covered[-1][1] == SLOTS - 1
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(covered))
    assert sum(p.slot_count for p in primaries) == SLOTS
    for primary in primaries:
        assert redis_cluster.replica_of(primary.port).primary_id == primary.node_id
    # What a cluster client reads (CLUSTER SLOTS) agrees with the fixture's view.
    slots = cluster_client.cluster_slots()
    assert sum(hi - lo + 1 for lo, hi in slots) == SLOTS
    for port in redis_cluster.live_ports():
        info = info_fields(redis_cluster.ask(port, "CLUSTER", "INFO") or "")
        assert info["cluster_state"] == "ok" and int(info["cluster_slots_ok"]) == SLOTS
    assert redis_cluster.url == f"redis://{redis_cluster.host}:{redis_cluster.primaries[0].port}"


def test_a_write_lands_on_its_slots_primary_reaches_its_replica_and_reads_back(
    redis_cluster: RedisClusterBase, cluster_client: redis.RedisCluster, key_prefix: str
) -> None:
    keys = [f"{key_prefix}:k{i}" for i in range(60)]  # spread over all three primaries
    for key in keys:
        cluster_client.set(key, key.encode())
    owners = {}
    for primary in redis_cluster.primaries:
        for key in keys:
            if _owns(primary.slots, key):
                owners[key] = primary
    assert len(owners) == len(keys) and len({p.port for p in owners.values()}) == 3

    # On the owning primary itself, and on its replica once WAIT says it got there.
    key = keys[0]
    primary = owners[key]
    with redis_cluster.node_client(primary.port) as direct:
        assert direct.get(key) == key.encode()
        assert direct.wait(1, 5000) >= 1
    with redis_cluster.node_client(redis_cluster.replica_of(primary.port).port) as replica:
        replica.readonly()
        assert replica.get(key) == key.encode()

    # Through another cluster client, entered at a node that does not own the key.
    other = next(p for p in redis_cluster.primaries if p.port != primary.port)
    elsewhere = redis.RedisCluster(host=redis_cluster.host, port=other.port)
    try:
        assert elsewhere.mget_nonatomic(keys) == [k.encode() for k in keys]
    finally:
        elsewhere.close()


def test_a_killed_primary_is_replaced_by_its_replica_and_rejoins_as_a_replica(
    private_redis_cluster: LocalRedisCluster,
) -> None:
    cluster = private_redis_cluster
    client = cluster.client()
    try:
        client.set("survivor", b"1")
        victim = next(p for p in cluster.primaries if _owns(p.slots, "survivor"))
        with cluster.node_client(victim.port) as owner:
            assert owner.wait(1, 5000) == 1  # replicated before the kill

        expected = cluster.kill_primary(victim.port)
        assert victim.port not in cluster.live_ports()
        started = time.monotonic()
        heir = cluster.wait_failover(victim.port)
        assert time.monotonic() - started < 15
        assert heir.port == expected.port and heir.role == "primary"
        assert heir.slots == victim.slots
        assert cluster.url != f"redis://127.0.0.1:{victim.port}"  # a live primary
        primaries = {n.port for n in cluster.primaries}
        assert victim.port not in primaries and heir.port in primaries and len(primaries) == 3
        assert client.get("survivor") == b"1"  # the client follows the MOVED slots

        cluster.restart(victim.port)
        back = next(n for n in cluster.nodes if n.port == victim.port)
        assert back.role == "replica" and back.primary_id == heir.node_id
        assert len(cluster.primaries) == 3 and len(cluster.replicas) == 3
    finally:
        client.close()


def test_an_existing_cluster_is_seen_through_any_node_and_cannot_be_killed(
    redis_cluster: RedisClusterBase,
) -> None:
    replica = redis_cluster.replicas[0]
    existing = ExistingRedisCluster(f"redis://{redis_cluster.host}:{replica.port}")
    assert existing.can_kill is False
    assert existing.nodes == redis_cluster.nodes
    assert existing.healthy(primaries=len(redis_cluster.primaries))
    assert existing.url in {f"redis://{redis_cluster.host}:{p.port}" for p in existing.primaries}
    with pytest.raises(NotImplementedError):
        existing.kill_primary(existing.primaries[0].port)


def test_cluster_nodes_lines_with_migrations_and_failures_parse() -> None:
    text = (
        "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460 [5461->-b2]\n"
        "b2 127.0.0.1:7001@17001 master,fail - 0 0 2 connected\n"
        "c3 127.0.0.1:7002@17002 slave a1 0 0 1 connected\n"
        "d4 127.0.0.1:7003@17003 master - 0 0 3 connected 5461 5462-16383\n"
    )
    a, b, c, d = parse_cluster_nodes(text)
    assert (a.role, a.slots, a.failed) == ("primary", ((0, 5460),), False)
    assert (b.failed, b.slots) == (True, ())
    assert (c.role, c.primary_id, c.port) == ("replica", "a1", 7002)
    assert d.slots == ((5461, 5461), (5462, 16383)) and d.slot_count == SLOTS - 5461


def _owns(slots: tuple[tuple[int, int], ...], key: str) -> bool:
    slot = key_slot(key.encode())
    return any(lo <= slot <= hi for lo, hi in slots)
