"""The pipeline on a Redis Cluster (3 primaries + 3 replicas started from `redis-server`):
producers keep the one-node contract (XADD `<prefix>:tasks` with `redis-cli -c` or ioredis,
read `<prefix>:result:<id>`), the workers find out it is a Cluster and run every stage in
partitions, and under worker kills every task gets exactly one result, its own."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.cluster import RedisCluster

from pipeline.fake_claude import FakeClaudeServer
from pipeline.fake_claude.stats import prompt_digest
from pipeline.runtime.keys import Keys
from tests.conftest import FAST, StartFake
from tests.helpers.redis_cluster import RedisClusterBase
from tests.helpers.workers import Workers, wait_until

pytestmark = pytest.mark.chaos
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cprefix(redis_cluster: RedisClusterBase) -> Iterator[str]:
    """A prefix of this test's own on the cluster; its keys are deleted afterwards."""
    name = f"c{uuid.uuid4().hex[:10]}"
    yield name
    client = RedisCluster.from_url(redis_cluster.url)
    try:
        for key in list(client.scan_iter(match=Keys(name).pattern(), count=1000)):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def cclient(redis_cluster: RedisClusterBase) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(redis_cluster.url)
    yield client
    client.close()


def cluster_env(url: str, prefix: str, fake: FakeClaudeServer, **more: str) -> dict[str, str]:
    return {"REDIS_URL": url, "PIPELINE_PREFIX": prefix, **FAST,
            "ANTHROPIC_BASE_URL": fake.base_url, "ANTHROPIC_API_KEY": "good-key",
            "PIPELINE_REDIS__MAX_CONNECTIONS": "256", **more}  # fmt: skip


def produce_with_redis_cli(port: int, prefix: str, ids: list[str]) -> None:
    """XADD with `redis-cli -c` (it follows MOVED like any cluster-aware client), as a
    producer with no pipeline code at all would."""
    fields = "model haiku max_tokens 50 prompt"
    lines = [f'XADD {prefix}:tasks * id {t} {fields} "cluster job {t}"' for t in ids]
    done = subprocess.run(["redis-cli", "-c", "-p", str(port)], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert "ERR" not in done.stdout, done.stdout[:500]


def results(client: RedisCluster, prefix: str, ids: list[str]) -> dict[str, dict[str, str]]:
    keys = Keys(prefix)
    found = {}
    for task_id in ids:
        raw = client.hgetall(keys.result(task_id))
        found[task_id] = {k.decode(): v.decode() for k, v in raw.items()}
    return found


def wait_results(client: RedisCluster, prefix: str, ids: list[str], timeout: float = 120) -> None:
    keys = Keys(prefix)
    left = list(ids)

    def all_there() -> bool:
        left[:] = [i for i in left if not client.exists(keys.result(i))]
        return not left

    try:
        wait_until(all_there, timeout, 0.5, what=f"{len(ids)} results on the cluster")
    except AssertionError:
        parts = Keys(prefix, partitions=16).each_partition()
        raise AssertionError(
            f"{len(left)} results missing, e.g. {left[:3]}; ingress {client.xlen(keys.ingress)}, "
            f"unpublished {sum(client.xlen(p.landed) for p in parts)}, "
            f"in partitions {[client.exists(p.landing(left[0])) for p in parts[:1]]}"
        ) from None


def assert_each_answered_once_with_its_own(
    client: RedisCluster, prefix: str, fake: FakeClaudeServer, ids: list[str],
    prompts: dict[str, str],
) -> Counter[str]:  # fmt: skip
    """Every task one `completed` result whose output came from a call for its own prompt;
    returns the completion events per id (at least one each)."""
    found = results(client, prefix, ids)
    assert all(r.get("status") == "completed" for r in found.values()), [
        (t, r.get("status"), r.get("error")) for t, r in found.items()
        if r.get("status") != "completed"
    ][:5]  # fmt: skip
    stats = fake.stats()
    by_tag: dict[str, list[str]] = {}
    for key in stats["calls_by_request"]:
        by_tag.setdefault(key[:12], []).append(key)
    for task_id, result in found.items():
        tag = result["output"].split(" ", 1)[0].removeprefix("fake-claude:")
        asked = {stats["prompt_by_request"].get(key) for key in by_tag.get(tag, [])}
        assert prompt_digest(prompts[task_id]) in asked, (task_id, result["output"][:40])
    events: Counter[str] = Counter()
    for _id, fields in client.xrange(Keys(prefix).done):
        events[fields[b"id"].decode()] += 1
    assert not [t for t in ids if events[t] == 0], "every task's completion is announced"
    return events


def test_producers_keep_their_contract_on_a_cluster(
    redis_cluster: RedisClusterBase, cprefix: str, cclient: RedisCluster, start_fake: StartFake,
    tmp_path: Path,
) -> None:  # fmt: skip
    """redis-cli -c and ioredis XADD to `<prefix>:tasks`; workers given any node's URL run
    all four stages in 16 partitions; each result lands at `<prefix>:result:<id>`."""
    fake = start_fake(latency_ms=20)
    workers = Workers(cluster_env(redis_cluster.url, cprefix, fake), tmp_path, app="stages:app")
    try:
        workers.start()
        ids = [f"cli-{i}" for i in range(150)]
        port = redis_cluster.primaries[1].port  # not the node the workers were given
        produce_with_redis_cli(port, cprefix, ids)
        node_ids = produce_with_ioredis(redis_cluster, cprefix, 50)
        everyone = ids + node_ids
        wait_results(cclient, cprefix, everyone)
        prompts = {t: f"cluster job {t}" for t in everyone}
        events = assert_each_answered_once_with_its_own(cclient, cprefix, fake, everyone, prompts)
        assert set(events.values()) == {1}, "no worker died: one event each"
        assert fake.stats()["succeeded"] == len(everyone), "each paid once"
        # The work was spread over partitions, on every primary.
        keys = Keys(cprefix, partitions=16)
        used = {keys.partition_of(t) for t in everyone}
        assert len(used) == 16
        assert cclient.xlen(keys.ingress) == 0, "every ingress entry moved and acknowledged"
        for part in keys.each_partition():
            assert cclient.xlen(part.landed) == 0, "every result published"
    finally:
        workers.stop_all()


def produce_with_ioredis(cluster: RedisClusterBase, prefix: str, n: int) -> list[str]:
    """XADD from Node.js with ioredis's Cluster client (skipped where Node is absent)."""
    node = shutil.which("node")
    modules = ROOT / "tests" / "node" / "node_modules" / "ioredis"
    if node is None or not modules.exists():
        pytest.skip("needs node and tests/node's ioredis (npm ci --prefix tests/node)")
    ids = [f"node-{i}" for i in range(n)]
    script = """
const Redis = require('ioredis');
const [port, prefix, n] = process.argv.slice(2);
const cluster = new Redis.Cluster([{host: '127.0.0.1', port: Number(port)}]);
(async () => {
  for (let i = 0; i < Number(n); i++) {
    const id = `node-${i}`;
    await cluster.xadd(`${prefix}:tasks`, '*', 'id', id, 'model', 'haiku',
                       'max_tokens', '50', 'prompt', `cluster job ${id}`);
  }
  await cluster.quit();
})().catch((e) => { console.error(e); process.exit(1); });
"""
    port = cluster.primaries[2].port
    env = {**os.environ, "NODE_PATH": str(ROOT / "tests" / "node" / "node_modules")}
    # `node -e` puts its first argument at argv[1]: "-" for the script keeps argv[2..].
    subprocess.run([node, "-", str(port), prefix, str(n)], input=script, text=True, env=env,
                   check=True, timeout=60, capture_output=True)  # fmt: skip
    return ids


def test_every_task_once_while_workers_are_killed(
    redis_cluster: RedisClusterBase, cprefix: str, cclient: RedisCluster, start_fake: StartFake,
    tmp_path: Path,
) -> None:  # fmt: skip
    """1,000 tasks through all four stages while a worker is SIGKILLed every few seconds
    (a fresh one started each time): each task one result, its own."""
    fake = start_fake(latency_ms=400)
    # Four partitions: two cores run every process of this test (the cluster's six too).
    # Eight calls at a time per lane and partition: the run lasts long enough for kills.
    env = cluster_env(redis_cluster.url, cprefix, fake, PIPELINE_REDIS__PARTITIONS="4",
                      PIPELINE_RETRY__PROMOTE_EVERY_MS="250")  # fmt: skip
    workers = Workers(env, tmp_path, app="stages:app")
    kills = 0
    slow = ["-n", "8"]
    try:
        live = [workers.start(args=slow), workers.start(args=slow)]
        ids = [f"k-{i}" for i in range(1000)]
        produce_with_redis_cli(redis_cluster.primaries[0].port, cprefix, ids)
        keys = Keys(cprefix)
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and kills < 8:
            time.sleep(2.5)
            if sum(1 for i in ids[::25] if cclient.exists(keys.result(i))) == len(ids[::25]):
                break
            victim = live.pop(0)
            victim.signal(signal.SIGKILL)
            victim.wait(10)
            kills += 1
            live.append(workers.start(args=slow))
        wait_results(cclient, cprefix, ids, timeout=120)
        prompts = {t: f"cluster job {t}" for t in ids}
        events = assert_each_answered_once_with_its_own(cclient, cprefix, fake, ids, prompts)
        assert kills >= 2, "the run outlasted a few kills"
        # A publisher killed between its two writes repeats an event, never a result.
        assert sum(events.values()) - len(ids) <= kills * 256
        paid = fake.stats()["succeeded"]
        # A call cut off by a kill may be paid again: at most what the killed workers had
        # in flight.
        assert len(ids) <= paid <= len(ids) + kills * 8 * 4, (paid, kills)
    finally:
        workers.stop_all()


def test_a_task_id_always_meets_its_duplicates_in_one_partition(
    redis_cluster: RedisClusterBase, cprefix: str, cclient: RedisCluster, start_fake: StartFake,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The same id sent twice (a producer's retry) is one task, answered once: both copies
    are moved to the id's partition, where the second is recognised."""
    fake = start_fake(latency_ms=20)
    workers = Workers(cluster_env(redis_cluster.url, cprefix, fake), tmp_path, app="stages:app")
    try:
        workers.start()
        ids = [f"dup-{i}" for i in range(40)]
        produce_with_redis_cli(redis_cluster.primaries[0].port, cprefix, ids + ids)
        wait_results(cclient, cprefix, ids)
        time.sleep(1.5)  # the copies settle
        assert fake.stats()["succeeded"] == len(ids)
        statuses = {r["status"] for r in results(cclient, cprefix, ids).values()}
        assert statuses == {"completed"}
    finally:
        workers.stop_all()


def primary_serving(cluster: RedisClusterBase, client: RedisCluster, key: str) -> int:
    node = client.get_node_from_key(key)
    assert node is not None
    return int(node.port)


@pytest.mark.parametrize("durability", ["replicated", "acknowledged"])
def test_a_primary_killed_mid_run(
    private_redis_cluster: RedisClusterBase, cprefix_private: str, start_fake: StartFake,
    tmp_path: Path, durability: str, record_property: Any,
) -> None:  # fmt: skip
    """The primary serving the ingress is SIGKILLed while 600 tasks are in flight and its
    replica takes over. Replicated: no task lost, each paid once but for calls cut off.
    Acknowledged: what was lost is recorded (`record_property`), and no task is ever answered
    with another's output."""
    cluster = private_redis_cluster
    fake = start_fake(latency_ms=200)
    client = RedisCluster.from_url(cluster.url)
    victim = primary_serving(cluster, client, Keys(cprefix_private).ingress)
    entry = next(n.port for n in cluster.primaries if n.port != victim)
    # Workers are given a node that survives (a URL names the node a process starts from).
    # Leases of 10 s (15 s by default): a failover stalls every command for a few seconds on
    # this loaded machine, and with `FAST`'s 3 s leases entries passed between workers until
    # `max_deliveries` dead-lettered some.
    env = cluster_env(cluster.url_of(entry), cprefix_private, fake,
                      PIPELINE_REDIS__PARTITIONS="4",
                      PIPELINE_REDIS__DURABILITY=durability,
                      PIPELINE_RUNTIME__LEASE_MS="10000",
                      PIPELINE_RETRY__PROMOTE_EVERY_MS="250")  # fmt: skip
    workers = Workers(env, tmp_path, app="stages:app")
    try:
        workers.start()
        workers.start()
        ids = [f"f-{i}" for i in range(600)]
        produce_with_redis_cli(entry, cprefix_private, ids[:300])
        keys = Keys(cprefix_private)
        # Calls in flight, results landing: then the primary goes.
        wait_until(lambda: any(client.exists(keys.result(t)) for t in ids[:300]), 60, 0.1,
                   what="the first results")  # fmt: skip
        cluster.kill_primary(victim)
        cluster.wait_failover(victim)
        client.close()
        client = RedisCluster.from_url(cluster.url_of(entry))
        produce_with_redis_cli(entry, cprefix_private, ids[300:])
        if durability == "replicated":
            wait_results(client, cprefix_private, ids, timeout=120)
            prompts = {t: f"cluster job {t}" for t in ids}
            assert_each_answered_once_with_its_own(client, cprefix_private, fake, ids, prompts)
            paid = fake.stats()["succeeded"]
            print(f"replicated durability: 0 of {len(ids)} tasks lost, {paid} calls paid")
            # Only calls whose answer was on its way when the primary died may be paid again.
            assert len(ids) <= paid <= len(ids) + 2 * 64, paid
            return
        time.sleep(20)  # what will come has come
        have = [t for t in ids if client.exists(keys.result(t))]
        record_property("lost_without_replicated_durability", len(ids) - len(have))
        record_property("paid_calls", fake.stats()["succeeded"])
        print(
            f"acknowledged durability: {len(ids) - len(have)} of {len(ids)} tasks lost, "
            f"{fake.stats()['succeeded']} calls paid"
        )
        prompts = {t: f"cluster job {t}" for t in have}
        found = results(client, cprefix_private, have)
        completed = [t for t, r in found.items() if r.get("status") == "completed"]
        assert_each_answered_once_with_its_own(client, cprefix_private, fake, completed, prompts)
    finally:
        workers.stop_all()
        client.close()


@pytest.fixture
def cprefix_private() -> str:
    """A prefix on a cluster of the test's own (dropped with it)."""
    return f"c{uuid.uuid4().hex[:10]}"
