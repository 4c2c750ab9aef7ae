"""The operator's commands and the producer client on a partitioned deployment, against real
Redis: one node with `partitions = 4`, and a Redis Cluster (3 primaries + 3 replicas).

`pipeline status` and `pipeline cost` sum the partitions; `pipeline dlq` lists every
partition's letters (ids `p<N>/<entry id>`), shows and replays a letter in its own partition
and purges them all; `Client` submits and waits for results on the Cluster. The data comes
from the real workers (the four stages, the fake Claude API) where it can; what a test must
place exactly (a backlog in given partitions, two letters under one entry id) it writes as
the runtime would.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from pipeline.claude.config import load_settings
from pipeline.cli.main import app
from pipeline.client import Client
from pipeline.runtime.dlq import dlq_fields
from pipeline.runtime.keys import Keys
from tests.cli.conftest import cli_env
from tests.cli.test_cli import ROOT
from tests.client.test_client import until_waiting
from tests.conftest import FAST, StartFake
from tests.helpers.redis_cluster import RedisClusterBase
from tests.helpers.workers import Workers, wait_until

PARTITIONS = 4
QUALIFIED = re.compile(r"p(\d+)/\d+-\d+")


@dataclass
class Deployment:
    kind: str  # "node" or "cluster"
    url: str
    prefix: str
    env: dict[str, str]  # for the CLI and the workers
    direct: Any  # redis.Redis, or redis.RedisCluster on the Cluster

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix, partitions=PARTITIONS)

    def part(self, partition: int) -> Keys:
        return self.keys.of_partition(partition)


def _forget(direct: Any, prefix: str) -> None:
    """Delete a prefix's keys (every primary's, on a Cluster), one key at a time."""
    for key in list(direct.scan_iter(match=Keys(prefix).pattern(), count=1000)):
        direct.delete(key)


@pytest.fixture(params=["node", "cluster"])
def deployment(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Deployment]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    if request.param == "node":
        url, direct = redis_url, redis.Redis.from_url(redis_url)
    else:
        cluster: RedisClusterBase = request.getfixturevalue("redis_cluster")
        url, direct = cluster.url, cluster.client()
    env = {**cli_env(url, prefix), **FAST, "PIPELINE_REDIS__PARTITIONS": str(PARTITIONS)}
    try:
        yield Deployment(request.param, url, prefix, env, direct)
    finally:
        _forget(direct, prefix)
        direct.close()


def run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """`pipeline ARGS` in this process (exit code, stdout, stderr)."""
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def run_json(env: dict[str, str], *args: str) -> Any:
    code, out, err = run(env, *args, "--json")
    assert code == 0, (code, out, err)
    return json.loads(out)


def ids_in_partitions(keys: Keys, stem: str, n: int) -> list[str]:
    """`n` task ids `<stem>-<k>`, each in a partition of its own."""
    found: dict[int, str] = {}
    k = 0
    while len(found) < n:
        task_id = f"{stem}-{k}"
        found.setdefault(keys.partition_of(task_id) or 0, task_id)
        k += 1
    return list(found.values())


# ---- what the workers made: status, cost, results, dead letters ---------------------------------


def test_status_cost_and_the_dlq_across_partitions(
    deployment: Deployment, start_fake: StartFake, tmp_path: Path
) -> None:
    keys, env = deployment.keys, deployment.env
    fake = start_fake()
    workers = Workers({**env, "ANTHROPIC_BASE_URL": fake.base_url, "ANTHROPIC_API_KEY": "k"},
                      tmp_path, app="stages:app")  # fmt: skip
    worker = workers.start()
    good = [f"ok-{n}" for n in range(8)]
    bad = ids_in_partitions(keys, "bad", 3)
    assert len({keys.partition_of(i) for i in good}) > 1

    async def produce() -> dict[str, dict[str, str] | None]:
        settings = load_settings(env=env)
        async with Client.from_settings(settings) as client:
            tasks = [{"prompt": f"question {i}", "model": "haiku", "id": i} for i in good]
            tasks += [{"prompt": "hi", "model": "gpt-4", "id": i} for i in bad]
            assert await client.submit_many(tasks) == good + bad
            found = await asyncio.gather(*(client.result(i, wait=30) for i in good + bad))
            return dict(zip(good + bad, found, strict=True))

    results = asyncio.run(produce())
    assert all(results[i] and results[i]["status"] == "completed" for i in good), results  # type: ignore[index]
    assert all(results[i] and results[i]["status"] == "failed" for i in bad), results  # type: ignore[index]

    # status: every partition summed, nothing left between the partitions and producers
    wait_until(lambda: run_json(env, "status")["unpublished"] == 0, 10, 0.2, "published")
    status = run_json(env, "status")
    assert status["partitions"] == PARTITIONS and status["dlq"] == len(bad)
    assert status["unmoved"] == 0
    rows = {(row["stage"], row["lane"]): row for row in status["streams"]}
    for stage in [("cache-check", None), ("router", None), ("claude-call", "haiku"),
                  ("store", None)]:  # fmt: skip
        row = rows[stage]
        assert row["group_exists"] and row["consumers"] >= 1, row
        assert row["backlog"] == row["pending"] == row["delayed"] == 0, row
        assert len(row["partition_streams"]) == PARTITIONS
    code, text, _ = run(env, "status")
    assert code == 0 and f"partitions: {PARTITIONS}" in text and "0 results to publish" in text

    # cost: the ledger of every partition, summed, is what the results say was paid
    paid = [results[i] for i in good]
    cost = run_json(env, "cost")["total"]
    assert cost["requests"] == len(good)
    assert cost["input"] == sum(int(r["input_tokens"]) for r in paid if r)
    assert cost["output"] == sum(int(r["output_tokens"]) for r in paid if r)
    assert cost["cost_usd"] == pytest.approx(sum(float(r["cost_usd"]) for r in paid if r))
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    ledgers = [deployment.direct.exists(keys.of_partition(p).ledger(today))
               for p in range(PARTITIONS)]  # fmt: skip
    assert sum(ledgers) > 1  # written per partition, read as one

    # dlq list: every partition's letters, newest first, each id naming its partition
    letters = run_json(env, "dlq", "list")
    assert sorted(letter["task_id"] for letter in letters) == sorted(bad)
    for letter in letters:
        match = QUALIFIED.fullmatch(letter["dlq_id"])
        assert match, letter
        assert int(match[1]) == letter["partition"] == keys.partition_of(letter["task_id"])
    written = [tuple(map(int, x["dlq_id"].partition("/")[2].split("-"))) for x in letters]
    assert written == sorted(written, reverse=True)  # newest first, by when they were added
    target = letters[-1]
    shown = run_json(env, "dlq", "show", target["task_id"])
    assert shown["dlq_id"] == target["dlq_id"] and "gpt-4" in shown["error"]
    assert run_json(env, "dlq", "show", target["dlq_id"])["task_id"] == target["task_id"]

    # an undecodable task without an id: dead-lettered under its ingress entry id, in that
    # id's partition (it once reached the wrong slot and stopped the worker on a Cluster)
    entry_id = deployment.direct.xadd(keys.ingress, {"prompt": b"\xff\xfe"}).decode()
    wait_until(lambda: run_json(env, "status")["dlq"] == len(bad) + 1, 15, 0.2, "letter")
    (odd,) = [x for x in run_json(env, "dlq", "list") if x["task_id"] == entry_id]
    assert odd["partition"] == keys.partition_of(entry_id) and "UTF-8" in odd["error"]
    assert worker.proc.poll() is None, worker.log()[-3000:]

    # replay, workers stopped: the task is back in its own partition's stream, its results
    # (the partition's copy and the one producers read) gone, the letter out of the DLQ
    workers.stop_all()
    task, part = target["task_id"], deployment.part(target["partition"])
    code, out, err = run(env, "dlq", "replay", target["dlq_id"], "--yes")
    assert code == 0 and "replayed 1" in out, (out, err)
    assert not deployment.direct.exists(keys.result(task), part.landing(task))
    assert deployment.direct.xlen(part.stream("route")) == 1
    status = run_json(env, "status")
    assert status["dlq"] == len(bad)
    assert {(r["stage"], r["backlog"]) for r in status["streams"]} >= {("router", 1)}

    # ... and with workers it fails again, in the same partition, and is published again
    workers.start()

    async def result_again() -> dict[str, str] | None:
        async with Client.from_settings(load_settings(env=env)) as client:
            return await client.result(task, wait=20)

    again = asyncio.run(result_again())
    assert again is not None and again["status"] == "failed"
    wait_until(lambda: run_json(env, "status")["dlq"] == len(bad) + 1, 10, 0.2, "letter again")
    (letter,) = [x for x in run_json(env, "dlq", "list") if x["task_id"] == task]
    assert letter["partition"] == target["partition"] and letter["dlq_id"] != target["dlq_id"]

    # purge --all: every partition's DLQ and its byte count
    code, out, _ = run(env, "dlq", "purge", "--all", "--yes")
    assert code == 0 and f"purged {len(bad) + 1}" in out
    assert run_json(env, "status")["dlq"] == 0
    for p in range(PARTITIONS):
        assert not deployment.direct.exists(deployment.part(p).dlq, deployment.part(p).dlq_bytes)


# ---- what only a test can lay out exactly ---------------------------------------------------


def test_status_sums_each_partition_and_what_waits_between(deployment: Deployment) -> None:
    """Backlog, pending, delayed and DLQ in chosen partitions; tasks not yet moved in from
    the ingress, results not yet published: each counted once, summed."""
    r, keys = deployment.direct, deployment.keys
    for partition, n in ((0, 2), (2, 3), (1, 1)):
        for _ in range(n):
            r.xadd(deployment.part(partition).stream("route"), {"x": "1"})
    p1 = deployment.part(1).stream("route")
    r.xgroup_create(p1, "router", id="0")
    r.xreadgroup("router", "w-1", {p1: ">"}, count=1)
    r.zadd(deployment.part(3).delayed(deployment.part(3).stream("route")), {"m": 1})
    for partition in (0, 3):
        r.xadd(deployment.part(partition).dlq, {"task_id": "x"})
    for n in range(3):
        r.xadd(keys.ingress, {"prompt": f"p{n}"})
    for n in range(2):
        r.xadd(deployment.part(1).landed, {"id": f"t{n}"})

    status = run_json(deployment.env, "status")
    (router,) = [row for row in status["streams"] if row["stage"] == "router"]
    assert (router["backlog"], router["pending"], router["delayed"]) == (6, 1, 1)
    assert router["group_exists"] and router["consumers"] == 1
    assert router["oldest_pending_s"] is not None
    assert router["stream"] == f"{deployment.prefix}:{{p0-3}}:route"
    assert router["partition_streams"] == [deployment.part(p).stream("route") for p in range(4)]
    assert (status["dlq"], status["unmoved"], status["unpublished"]) == (2, 3, 2)
    code, text, _ = run(deployment.env, "status")
    assert code == 0, text
    assert "3 tasks to move in, 2 results to publish" in " ".join(text.split())
    code, text, _ = run(deployment.env, "status", "--watch", "--interval", "0.1",
                        "--iterations", "2")  # fmt: skip
    assert code == 0 and "out/s" in text and "partitions: 4" in text, text
    # a reader in one partition of one stage is no worker for the others
    code, _, err = run(deployment.env, "result", "nothing", "--wait", "1")
    assert code == 3 and "no worker is consuming any stage" in err, err


def test_dlq_ids_name_their_partition(deployment: Deployment) -> None:
    """Entry ids are unique in one stream only: a bare id found in two partitions' DLQs is
    refused with both ids; `p<N>/<id>` names one; a partition out of range is an error."""
    r, env = deployment.direct, deployment.env

    def letter(partition: int, entry_id: str, task_id: str) -> None:
        part = deployment.part(partition)
        fields = dlq_fields(
            task_id=task_id, stage="router", stream=part.stream("route"), entry_id="1-0",
            error=f"bad {task_id}", deliveries=1, attempts=1, fields={}, traceparent=None,
            tracestate=None, max_field_bytes=1024,
        )  # fmt: skip
        r.xadd(part.dlq, fields, id=entry_id)  # type: ignore[arg-type]
        r.incrby(part.dlq_bytes, int(fields["size"]))

    letter(0, "5-0", "a")
    letter(2, "5-0", "b")
    letter(1, "6-0", "c")

    code, _, err = run(env, "dlq", "show", "5-0")
    assert code == 2 and "p0/5-0" in err and "p2/5-0" in err, err
    assert run_json(env, "dlq", "show", "p2/5-0")["task_id"] == "b"
    assert run_json(env, "dlq", "show", "6-0")["dlq_id"] == "p1/6-0"
    code, _, err = run(env, "dlq", "purge", "p9/5-0", "--yes")
    assert code == 2 and "no partition 9" in err, err
    listed = run_json(env, "dlq", "list")
    assert [x["dlq_id"] for x in listed] == ["p1/6-0", "p2/5-0", "p0/5-0"]
    code, out, _ = run(env, "dlq", "purge", "6-0", "p0/5-0", "--yes")
    assert code == 0 and "purged 2" in out
    assert [x["dlq_id"] for x in run_json(env, "dlq", "list")] == ["p2/5-0"]
    assert int(r.get(deployment.part(1).dlq_bytes)) == 0


# ---- the Cluster only: its default partitions, every primary's durability, the client ---------


@pytest.fixture
def cluster_env(redis_cluster: RedisClusterBase) -> Iterator[tuple[dict[str, str], Any]]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    direct = redis_cluster.client()
    try:
        yield {**cli_env(redis_cluster.url, prefix), **FAST}, direct
    finally:
        _forget(direct, prefix)
        direct.close()


def test_a_cluster_has_16_partitions_unless_told_and_each_primary_is_checked(
    redis_cluster: RedisClusterBase, cluster_env: tuple[dict[str, str], Any]
) -> None:
    env, _ = cluster_env
    status = run_json(env, "status")
    assert status["partitions"] == 16 and status["unmoved"] == 0
    assert all(len(row["partition_streams"]) == 16 for row in status["streams"])
    assert status["redis"] is not None  # asked of each primary (no pipelined CONFIG GET)

    primary = redis_cluster.primaries[-1]
    node = redis_cluster.node_client(primary.port)
    try:
        node.config_set("maxmemory-policy", "allkeys-lru")
        findings = run_json(env, "status")["redis"]["findings"]
    finally:
        node.config_set("maxmemory-policy", "noeviction")
        node.close()
    (eviction,) = [f for f in findings if f["code"] == "eviction"]
    assert eviction["message"].startswith(f"on {primary.host}:{primary.port}: ")
    assert "allkeys-lru" in eviction["message"]


def test_the_client_submits_and_waits_on_a_cluster(
    cluster_env: tuple[dict[str, str], Any],
) -> None:
    """No worker: the producer's keys are the same as on one node, so a result written where
    producers read it, and its event on the done stream, wake the waiter."""
    env, direct = cluster_env
    keys = Keys(env["PIPELINE_PREFIX"])

    async def scenario() -> None:
        async with Client.from_settings(load_settings(env=env)) as client:
            ids = await client.submit_many([{"prompt": f"t{n}"} for n in range(50)])
            assert await client.backlog() == 50 == direct.xlen(keys.ingress)
            assert client.keys.partitions == 16  # found out at the first command
            waiter = asyncio.create_task(client.result(ids[7], wait=10))
            await until_waiting(client, 1)
            direct.hset(keys.result(ids[7]), mapping={"status": "completed", "output": "ok"})
            direct.xadd(keys.done, {"id": ids[7], "status": "completed"})
            found = await asyncio.wait_for(waiter, 5)
            assert found == {"status": "completed", "output": "ok"}
            assert await client.result(ids[8]) is None

    asyncio.run(scenario())


def test_the_demo_runs_on_a_cluster_and_leaves_no_key(redis_cluster: RedisClusterBase) -> None:
    """`pipeline demo` pointed at a Cluster node: it finds Redis there, runs its tasks across
    partitions and deletes its keys from every primary."""
    direct = redis_cluster.client()
    before = set(direct.scan_iter(match="demo-*", count=1000))
    env = {**cli_env(redis_cluster.url, "unused"), "PIPELINE_REDIS__PARTITIONS": "4"}
    env.pop("ANTHROPIC_API_KEY", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo", "--tasks", "20", "--workers", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    try:
        assert proc.returncode == 0, out
        assert f"Redis: {redis_cluster.url}" in out, out  # reached, not a private server
        assert "submitted 20  completed 20  failed 0" in out, out
        assert set(direct.scan_iter(match="demo-*", count=1000)) == before
    finally:
        direct.close()


def test_without_partitions_status_and_dlq_read_as_before(redis_url: str, prefix: str) -> None:
    """One node, no partitions: the streams' own keys, no partition fields, bare DLQ ids."""
    env = {**cli_env(redis_url, prefix), **FAST}
    keys = Keys(prefix)
    direct = redis.Redis.from_url(redis_url)
    try:
        direct.xadd(keys.stream("route"), {"x": "1"})
        direct.xadd(keys.dlq, {"task_id": "a", "stage": "router"}, id="7-0")
    finally:
        direct.close()
    status = run_json(env, "status")
    (router,) = [row for row in status["streams"] if row["stage"] == "router"]
    assert router["stream"] == keys.stream("route") and router["backlog"] == 1
    assert "partition_streams" not in router
    assert (status["partitions"], status["unmoved"], status["unpublished"]) == (0, None, None)
    code, text, _ = run(env, "status")
    assert code == 0 and "partitions:" not in text
    (letter,) = run_json(env, "dlq", "list")
    assert letter["dlq_id"] == "7-0" and "partition" not in letter
    code, _, err = run(env, "dlq", "show", "p1/7-0")
    assert code == 2 and "no partitions" in err, err


# ---- the layout: recorded by the first worker, changed only once drained ----------------------


def test_a_worker_with_another_partition_count_refuses_to_start(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """The first worker records the layout; one configured with another count would read
    streams nobody writes (and leave the old ones stranded): it exits 2 with one line."""
    env = {**cli_env(redis_url, prefix), **FAST, "PIPELINE_REDIS__PARTITIONS": "4"}
    workers = Workers(env, tmp_path, app="stages:app")
    try:
        first = workers.start()
        wait_until(lambda: " running " in first.log(), 30, what="the first worker")
        assert redis.Redis.from_url(redis_url).get(Keys(prefix).layout) == b"4"
        other = workers.start(extra_env={"PIPELINE_REDIS__PARTITIONS": "8"})
        assert other.wait(30) == 2
        errors = [line for line in other.log().splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "redis.partitions" in errors[0], other.log()[-1500:]
        assert "laid out in 4 partitions" in errors[0] and "pipeline partitions set 8" in errors[0]
        # The CLI counts the recorded layout's streams only: told otherwise, it says so.
        code, _out, err = run({**env, "PIPELINE_REDIS__PARTITIONS": "8"}, "status")
        assert code == 2 and "redis.partitions" in err
    finally:
        workers.stop_all()


def test_the_layout_changes_only_once_drained(redis_url: str, prefix: str, tmp_path: Path) -> None:
    env = {**cli_env(redis_url, prefix), **FAST, "PIPELINE_REDIS__PARTITIONS": "4"}
    direct = redis.Redis.from_url(redis_url)
    keys = Keys(prefix, partitions=4)
    direct.set(keys.layout, 4)
    # Something still in the old layout: a task queued in a partition, one to be moved.
    direct.xadd(keys.of_partition(2).stream("route"), {"n": "1"})
    direct.xadd(keys.ingress, {"prompt": "hi", "model": "haiku"})
    layout = run_json(env, "partitions", "show")
    assert layout["partitions"] == 4 and layout["recorded"] is True
    assert any("router" in left for left in layout["left"]), layout
    assert any("not yet moved" in left for left in layout["left"]), layout
    code, _out, err = run(env, "partitions", "set", "8")
    assert code == 1 and "not drained" in err and "router" in err
    assert direct.get(keys.layout) == b"4"
    # Drained: the layout changes, and workers of the new count start.
    direct.delete(keys.of_partition(2).stream("route"), keys.ingress)
    code, _out, err = run(env, "partitions", "set", "8")
    assert code == 0, err
    assert direct.get(keys.layout) == b"8"
    workers = Workers({**env, "PIPELINE_REDIS__PARTITIONS": "8"}, tmp_path, app="stages:app")
    try:
        worker = workers.start()
        wait_until(lambda: " running " in worker.log(), 30, what="a worker of the new layout")
        assert worker.proc.poll() is None
    finally:
        workers.stop_all()
        direct.close()
