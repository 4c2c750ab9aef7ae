"""The batch lane at scale: one batch of many tasks through the four real stages.

    python benchmarks/batch_lane.py --tasks 100000

A private redis-server, the fake Claude API in its own process (its Message Batches API
ending a batch `--processing-s` after it is created) and one `pipeline worker --all` process.
Every task says `batch=true`; `batch.max_requests` is the task count, so they go as one batch
(the API takes up to 100,000). Reported: the time to shelve them all, the time from the last
task shelved to the last result, the worker's CPU per task (user + system, from /proc) and its
peak RSS (VmHWM), which must not grow with whole batches held in memory; and the fake's count
of requests per custom_id (each exactly once). The last line is
`cpu_ms_per_task=<n> peak_rss_mib=<n>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.sustained import (  # noqa: E402
    BenchError,
    cpu_s,
    log_tail,
    start_fake,
    start_workers,
    stop,
)
from pipeline.runtime.embedded_redis import RedisServer  # noqa: E402
from pipeline.runtime.keys import Keys  # noqa: E402


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def submit(url: str, keys: Keys, n: int, tag: str) -> None:
    redis = Redis.from_url(url)
    try:
        for i in range(0, n, 1000):
            async with redis.pipeline(transaction=False) as pipe:
                for j in range(i, min(n, i + 1000)):
                    pipe.xadd(keys.ingress, {"id": f"{tag}-{j}", "prompt": f"{tag} backfill {j}",
                                             "model": "haiku", "batch": "true",
                                             "max_tokens": "200"})  # fmt: skip
                await pipe.execute()
    finally:
        await redis.aclose()


async def wait(url: str, keys: Keys, n: int, timeout_s: float) -> tuple[float, float]:
    """(seconds until every task is shelved, seconds until every result)."""
    redis = Redis.from_url(url)
    started = time.monotonic()
    shelved_at = None
    try:
        while True:
            if shelved_at is None and await redis.hlen(keys.batch_shelf("haiku")) >= n:
                shelved_at = time.monotonic()
            if await redis.xlen(keys.done) >= n:
                done = time.monotonic()
                return (shelved_at or done) - started, done - (shelved_at or started)
            if time.monotonic() - started > timeout_s:
                raise BenchError(f"only {await redis.xlen(keys.done)} of {n} results in time")
            await asyncio.sleep(0.2)
    finally:
        await redis.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--processing-s", type=float, default=5.0)
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    args = parser.parse_args()
    if not 1 <= args.tasks <= 100_000:
        parser.error("--tasks: 1 to 100000 (one batch)")
    tag = uuid.uuid4().hex[:6]
    keys = Keys(f"batch-{tag}")
    logdir = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    server = RedisServer(logdir / "redis").start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        fake_args = argparse.Namespace(
            latency_ms=5.0, sigma=0.0, latency_cap_ms=1000.0, seed=3, overloaded_rate=0.0,
            server_error_rate=0.0, rpm=None,
        )  # fmt: skip
        fake, base_url = start_fake(fake_args, logdir)
        procs.append(fake)
        _post(f"{base_url}/_fake/config", {"batch_processing_s": args.processing_s})
        env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_AUTH_TOKEN"}
        env |= {
            "REDIS_URL": server.url, "PIPELINE_PREFIX": keys.prefix,
            "ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "bench-key",
            "PIPELINE_BATCH__MAX_REQUESTS": str(args.tasks), "PIPELINE_BATCH__MAX_WAIT_S": "600",
            "PIPELINE_BATCH__POLL_S": "1", "PIPELINE_RESULTS__DONE_MAXLEN": str(2 * args.tasks),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        }  # fmt: skip
        [worker] = start_workers(1, env, logdir)
        procs.append(worker)
        print(f"{args.tasks:,} tasks with batch=true, one worker --all; logs {logdir}", flush=True)
        began = time.monotonic()
        asyncio.run(submit(server.url, keys, args.tasks, tag))
        shelve_s, answer_s = asyncio.run(wait(server.url, keys, args.tasks, args.timeout_s))
        wall = time.monotonic() - began
        cpu = cpu_s(worker.pid)
        rss = peak_rss_mib(worker.pid)
        with urllib.request.urlopen(f"{base_url}/_fake/stats", timeout=60) as reply:
            batches = json.loads(reply.read())["batches"]
    except BenchError as exc:
        print(f"ERROR: {exc}\n{log_tail(logdir / 'worker-0.log')}", file=sys.stderr)
        return 1
    finally:
        stop(procs, wait_s=30)
        server.stop()
    per_id = batches["requests_by_custom_id"].values()
    print(f"  shelved in {shelve_s:.1f} s; last result {answer_s:.1f} s after the last shelved "
          f"(fake processing {args.processing_s:g} s); {wall:.1f} s in all")  # fmt: skip
    print(f"  batches created {batches['created']}, requests {sum(per_id):,}, "
          f"each custom_id once: {set(per_id) == {1}}")  # fmt: skip
    print(f"  worker CPU {cpu:.1f} s = {cpu * 1000 / args.tasks:.2f} ms per task "
          f"(all four stages and the lane); peak RSS {rss:.0f} MiB")  # fmt: skip
    print(f"cpu_ms_per_task={cpu * 1000 / args.tasks:.2f} peak_rss_mib={rss:.0f}")
    return 0


def _post(url: str, body: dict[str, object]) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10):
        pass


if __name__ == "__main__":
    sys.exit(main())
