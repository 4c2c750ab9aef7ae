"""Runtime throughput: N tasks through four chained trivial stages, one process per stage.

    python benchmarks/runtime.py --tasks 100000

Prints tasks/s end to end and each worker's peak RSS; the last line is `tasks_per_s=<n>`.
With --baseline it first runs a minimal hand-written XREADGROUP/XADD/XACK chain (no leases,
no fencing, no DLQ) on the same machine in the same run, for a ratio.
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


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def load(client: redis.Redis, stream: str, n: int) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(stream, {"n": str(i), "prompt": "hello world"})
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()


def watch(
    client: redis.Redis, key: str, n: int, procs: list[subprocess.Popen[bytes]]
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


def run_pipeline(url: str, n: int, concurrency: int) -> tuple[float, float, dict[str, float]]:
    prefix = f"bench{os.getpid()}"
    keys = Keys(prefix)
    client = redis.Redis.from_url(url)
    load(client, keys.ingress, n)
    env = {
        **os.environ,
        "REDIS_URL": url,
        "PIPELINE_PREFIX": prefix,
        "PIPELINE_RESULTS__DONE_MAXLEN": str(n * 2),
        "PYTHONPATH": str(ROOT),
    }
    procs = {}
    for stage in STAGES:
        cmd = [sys.executable, "-m", "pipeline.cli", "worker", "--app", "benchmarks.bench_app:app",
               "--stage", stage, "-n", str(concurrency)]  # fmt: skip
        procs[stage] = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    cpu0 = redis_cpu_s(client)
    overall, steady = watch(client, keys.done, n, list(procs.values()))
    cpu = {stage: cpu_s(p.pid) for stage, p in procs.items()}
    cpu["redis-server"] = redis_cpu_s(client) - cpu0
    for name, seconds in cpu.items():
        print(f"  CPU {name}: {seconds * 1e6 / n:.1f} us per task")
    rss = {stage: peak_rss_mb(p.pid) for stage, p in procs.items()}
    for p in procs.values():
        p.send_signal(signal.SIGTERM)
    for p in procs.values():
        p.wait(30)
    for key in client.scan_iter(match=keys.pattern(), count=5000):
        client.unlink(key)
    client.close()
    return overall, steady, rss


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
    args = parser.parse_args()
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
        overall, rate, rss = run_pipeline(url, args.tasks, args.concurrency)
    finally:
        if server:
            server.stop()
    print(f"pipeline runtime, 4 stages x 1 process, {args.tasks:,} tasks: {rate:,.0f} tasks/s "
          f"steady ({overall:,.0f} with start-up)")  # fmt: skip
    for stage, mb in rss.items():
        print(f"  peak RSS {stage}: {mb:.1f} MB")
    if args.baseline:
        print(f"ratio pipeline/baseline: {rate / base:.2f}")
    print(f"peak_rss_mb_max={max(rss.values()):.1f}")
    print(f"tasks_per_s={rate:.0f}")


if __name__ == "__main__":
    main()
