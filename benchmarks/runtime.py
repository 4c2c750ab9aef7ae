"""Runtime throughput: N tasks through four chained trivial stages, one process per stage.

    python benchmarks/runtime.py --tasks 100000

Prints tasks/s end to end and each worker's peak RSS; the last line is `tasks_per_s=<n>`.
With --baseline it first runs a minimal hand-written XREADGROUP/XADD/XACK chain (no leases,
no fencing, no DLQ) on the same machine in the same run, for a ratio.

With --cluster (docs/CLUSTER.md, docs/SCALE.md) the same four workers then run, in the same
run, on one node with partitions, and on a local Redis Cluster of 3 primaries and 3 replicas
(started from `redis-server`, as the tests do) with acknowledged and with replicated
durability; it prints CPU per task (workers, Redis) and Redis memory for each, and the ratios
to the single node:

    python benchmarks/runtime.py --tasks 50000 --cluster
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.runtime.embedded_redis import RedisServer  # noqa: E402
from pipeline.runtime.keys import Keys  # noqa: E402

STAGES = ("s1", "s2", "s3", "s4")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu_s(urls: list[str]) -> float:
    """CPU seconds the Redis servers at `urls` have used (each node of a Cluster)."""
    total = 0.0
    for url in urls:
        with redis.Redis.from_url(url) as node:
            info = node.info("cpu")
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


def redis_memory_mb(urls: list[str]) -> float:
    total = 0
    for url in urls:
        with redis.Redis.from_url(url) as node:
            total += int(node.info("memory")["used_memory"])
    return total / 2**20


class Target:
    """Where a run goes: one node, or a Cluster (every node's URL for CPU and memory)."""

    def __init__(self, url: str, nodes: list[str] | None = None, **env: str) -> None:
        self.url, self.nodes, self.env = url, nodes or [url], env
        self.cluster = nodes is not None

    def client(self) -> Any:
        if self.cluster:
            return redis.RedisCluster.from_url(self.url)
        return redis.Redis.from_url(self.url)


def load(client: Any, stream: str, n: int) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(stream, {"n": str(i), "prompt": "hello world"})
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()


def watch(
    client: Any, key: str, n: int, procs: list[subprocess.Popen[bytes]]
) -> tuple[float, float]:
    """Wait until `key` holds n entries: (tasks/s from the start, tasks/s from 5% to 100%).

    The second figure leaves out process start-up (imports, connecting), which is not
    throughput; both are printed.
    """
    start = time.perf_counter()
    warm_at, warm_n = None, 0
    while (done := client.xlen(key)) < n:
        if warm_at is None and done >= n // 20:
            warm_at, warm_n = time.perf_counter(), done
        time.sleep(0.01)
        if any(p.poll() is not None for p in procs):
            raise SystemExit("a worker exited early")
    end = time.perf_counter()
    steady = (n - warm_n) / (end - warm_at) if warm_at else n / (end - start)
    return n / (end - start), steady


class Run:
    """What one run of the four workers measured."""

    def __init__(self, overall: float, steady: float, rss: dict[str, float],
                 cpu_us: dict[str, float], redis_mb: float) -> None:  # fmt: skip
        self.overall, self.steady, self.rss, self.cpu_us = overall, steady, rss, cpu_us
        self.redis_mb = redis_mb

    @property
    def workers_us(self) -> float:
        return sum(us for name, us in self.cpu_us.items() if name != "redis-server")


def run_pipeline(target: Target, n: int, concurrency: int) -> Run:
    prefix = f"bench{os.getpid()}"
    keys = Keys(prefix)
    client = target.client()
    load(client, keys.ingress, n)
    env = {
        **os.environ,
        "REDIS_URL": target.url,
        "PIPELINE_PREFIX": prefix,
        "PIPELINE_RESULTS__DONE_MAXLEN": str(n * 2),
        "PYTHONPATH": str(ROOT),
        **target.env,
    }
    procs = {}
    for stage in STAGES:
        cmd = [sys.executable, "-m", "pipeline.cli", "worker", "--app", "benchmarks.bench_app:app",
               "--stage", stage, "-n", str(concurrency)]  # fmt: skip
        procs[stage] = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    cpu0 = redis_cpu_s(target.nodes)
    overall, steady = watch(client, keys.done, n, list(procs.values()))
    cpu = {stage: cpu_s(p.pid) for stage, p in procs.items()}
    cpu["redis-server"] = redis_cpu_s(target.nodes) - cpu0
    cpu_us = {name: seconds * 1e6 / n for name, seconds in cpu.items()}
    for name, us in cpu_us.items():
        print(f"  CPU {name}: {us:.1f} us per task")
    rss = {stage: peak_rss_mb(p.pid) for stage, p in procs.items()}
    redis_mb = redis_memory_mb(target.nodes)
    for p in procs.values():
        p.send_signal(signal.SIGTERM)
    for p in procs.values():
        p.wait(30)
    for key in client.scan_iter(match=keys.pattern(), count=5000):
        client.unlink(key)
    client.close()
    return Run(overall, steady, rss, cpu_us, redis_mb)


BASELINE = r"""
import asyncio, sys
from redis.asyncio import Redis
async def main(url, src, dst, n_total):
    r = Redis.from_url(url)
    try: await r.xgroup_create(src, "g", id="0", mkstream=True)
    except Exception: pass
    seen = 0
    while seen < n_total:
        reply = await r.xreadgroup("g", "c", {src: ">"}, count=500, block=1000)
        for _s, entries in reply or ():
            p = r.pipeline(transaction=False)
            for eid, fields in entries:
                p.xadd(dst, fields)
                p.xack(src, "g", eid)
            await p.execute()
            seen += len(entries)
    await r.aclose()
asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


def run_baseline(url: str, n: int) -> tuple[float, float]:
    prefix = f"base{os.getpid()}"
    client = redis.Redis.from_url(url)
    streams = [f"{prefix}:{i}" for i in range(5)]
    load(client, streams[0], n)
    procs = [subprocess.Popen([sys.executable, "-c", BASELINE, url, streams[i], streams[i + 1],
                               str(n)]) for i in range(4)]  # fmt: skip
    rates = watch(client, streams[4], n, [])
    for p in procs:
        p.wait()
    client.delete(*streams)
    client.close()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=512)
    parser.add_argument("--redis-url", default=None,
                        help="default: a private redis-server started for the run")  # fmt: skip
    parser.add_argument("--baseline", action="store_true",
                        help="also run a bare XREADGROUP/XADD/XACK chain for a ratio")  # fmt: skip
    parser.add_argument("--cluster", action="store_true",
                        help="also run on a local 3-primary Redis Cluster, for ratios")  # fmt: skip
    parser.add_argument("--partitions", type=int, default=16,
                        help="partitions for the --cluster runs (default 16)")  # fmt: skip
    args = parser.parse_args()
    if args.cluster:
        cluster_runs(args.tasks, args.concurrency, args.partitions)
        return
    server = None
    url = args.redis_url
    if url is None:
        server = RedisServer(Path(tempfile.mkdtemp(prefix="bench-redis-"))).start()
        url = server.url
    try:
        if args.baseline:
            base_all, base = run_baseline(url, args.tasks)
            print(f"baseline, bare XREADGROUP/XADD/XACK chain: {base:,.0f} tasks/s steady "
                  f"({base_all:,.0f} with start-up)")  # fmt: skip
        run = run_pipeline(Target(url), args.tasks, args.concurrency)
    finally:
        if server:
            server.stop()
    rate = run.steady
    print(f"pipeline runtime, 4 stages x 1 process, {args.tasks:,} tasks: {rate:,.0f} tasks/s "
          f"steady ({run.overall:,.0f} with start-up)")  # fmt: skip
    for stage, mb in run.rss.items():
        print(f"  peak RSS {stage}: {mb:.1f} MB")
    if args.baseline:
        print(f"ratio pipeline/baseline: {rate / base:.2f}")
    print(f"peak_rss_mb_max={max(run.rss.values()):.1f}")
    print(f"tasks_per_s={rate:.0f}")


def cluster_runs(n: int, concurrency: int, partitions: int) -> None:
    """One node (no partitions, then `partitions`), then a 3-primary Cluster (acknowledged,
    then replicated durability): the same four workers, one after another in one run."""
    from tests.helpers.redis_cluster import LocalRedisCluster

    runs: dict[str, Run] = {}
    server = RedisServer(Path(tempfile.mkdtemp(prefix="bench-redis-"))).start()
    cluster = LocalRedisCluster(Path(tempfile.mkdtemp(prefix="bench-cluster-"))).start()
    try:
        nodes = [cluster.url_of(node.port) for node in cluster.nodes]
        parts = str(partitions)
        plan = {
            "one node": Target(server.url),
            f"one node, {parts} partitions": Target(server.url, PIPELINE_REDIS__PARTITIONS=parts),
            "cluster 3+3": Target(cluster.url, nodes, PIPELINE_REDIS__PARTITIONS=parts),
            "cluster 3+3, replicated": Target(cluster.url, nodes, PIPELINE_REDIS__PARTITIONS=parts,
                                              PIPELINE_REDIS__DURABILITY="replicated"),
        }  # fmt: skip
        for name, target in plan.items():
            print(f"{name}:")
            runs[name] = run_pipeline(target, n, concurrency)
    finally:
        cluster.stop()
        server.stop()
    one = runs["one node"]
    print(f"\n4 stages x 1 process, {n:,} tasks; CPU per task in us, ratios to one node")
    print(f"{'run':<28}{'tasks/s':>9}{'workers':>9}{'ratio':>7}{'redis':>8}{'ratio':>7}{'MiB':>7}")
    for name, run in runs.items():
        redis_us = run.cpu_us["redis-server"]
        print(f"{name:<28}{run.steady:>9,.0f}{run.workers_us:>9.0f}"
              f"{run.workers_us / one.workers_us:>7.2f}{redis_us:>8.0f}"
              f"{redis_us / one.cpu_us['redis-server']:>7.2f}{run.redis_mb:>7.0f}")  # fmt: skip
    ack, rep = runs["cluster 3+3"], runs["cluster 3+3, replicated"]
    total = {name: run.workers_us + run.cpu_us["redis-server"] for name, run in runs.items()}
    print(f"cluster_cpu_ratio={total['cluster 3+3'] / total['one node']:.2f}")
    print(
        f"replicated_extra_us_per_task={rep.workers_us - ack.workers_us:.0f} (workers), "
        f"{rep.cpu_us['redis-server'] - ack.cpu_us['redis-server']:.0f} (redis)"
    )


if __name__ == "__main__":
    main()
