"""Shared rate limits vs the seed's sleep-2^n, side by side against one rate-limited API.

    python benchmarks/rate_limits.py                 # the issue's run: 5 minutes
    python benchmarks/rate_limits.py --minutes 1     # a quick look

One fake Claude API process enforces per-(API key, family) limits (default RPM 1,000,
ITPM 200,000, OTPM 40,000, lognormal latency with a 2 s median). Two clients use it at the
same time, each with its own API key (so each has its own buckets), each offered the same
workload at `--over` (3x) the binding limit's rate:

  - ours: the real pipeline (`pipeline worker` processes: one for cache-check/router/store,
    `--call-workers` for claude-call) sharing the limiter through a private Redis, limits
    learned from the API's headers (nothing configured);
  - seed: the seed's design in this process: `--seed-concurrency` coroutines take tasks
    from a queue, call the API, and on RateLimitError sleep 2^n s and push the task back.

The tasks (prompt ~150 tokens, max_tokens 256, the fake writes 20-256 tokens) make output
tokens per minute the binding limit. Utilisation is measured in the steady window (after
the first minute, when the bucket's initial capacity has been spent) from the fake's own
counts per key: output tokens per minute / OTPM, and 429s / calls. Printed side by side;
the last line is `ours_binding_use=<%> ours_429=<%>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import anthropic  # noqa: E402
import redis  # noqa: E402

from benchmarks.sustained import (  # noqa: E402
    BenchError,
    fake_stats,
    log_tail,
    stop,
    wait_for_port,
)
from pipeline.runtime.embedded_redis import RedisServer, free_port  # noqa: E402
from pipeline.runtime.keys import Keys  # noqa: E402

OURS, SEED = "bench-ours", "bench-seed"
FAMILY = "haiku"
MODEL = "claude-haiku-5-5"
MAX_TOKENS = 256
MEAN_OUTPUT = (20 + MAX_TOKENS) / 2  # the fake plans 20..max_output_tokens, capped


def prompt(i: int, tag: str) -> str:
    words = " ".join(f"w{(i * 7 + j) % 997}" for j in range(110))
    return f"[{tag} {i}] Classify the sentiment of this note: {words}"


@dataclass
class Window:
    """The fake's counts for one key at two moments."""

    start: dict[str, int] = field(default_factory=dict)
    end: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def delta(self, name: str) -> int:
        return self.end.get(name, 0) - self.start.get(name, 0)


def key_counts(stats: dict[str, Any], api_key: str) -> dict[str, int]:
    return dict(stats["by_key_family"].get(f"{api_key}|{FAMILY}", {}))


def start_fake(args: argparse.Namespace, logdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "pipeline.fake_claude", "--port", str(port),
           "--latency-ms", str(args.latency_ms), "--latency-sigma", str(args.sigma),
           "--rpm", str(args.rpm), "--itpm", str(args.itpm), "--otpm", str(args.otpm),
           "--config-json", json.dumps({"max_output_tokens": MAX_TOKENS})]  # fmt: skip
    log = logdir / "fake-claude.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    wait_for_port(port, proc, log, timeout_s=20)
    return proc, f"http://127.0.0.1:{port}"


def start_ours(
    args: argparse.Namespace, url: str, prefix: str, base_url: str, logdir: Path
) -> list[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "ANTHROPIC_"))}
    env |= {
        "REDIS_URL": url,
        "PIPELINE_PREFIX": prefix,
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": OURS,
        "PIPELINE_CACHE__ENABLED": "false",
        "PIPELINE_RETRY__MAX_ATTEMPTS": "50",
        "PYTHONPATH": str(ROOT),
    }
    groups = [["cache-check", "router", "store"]] + [["claude-call"]] * args.call_workers
    procs = []
    for i, stages in enumerate(groups):
        cmd = [sys.executable, "-m", "pipeline.cli", "worker"]
        cmd += [a for s in stages for a in ("--stage", s)]
        with open(logdir / f"worker-{i}.log", "wb") as out:
            procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            )
    return procs


async def feed_ours(client: redis.Redis, keys: Keys, rate: float, until: float) -> int:
    """Open loop: XADD what the schedule says is due every 50 ms."""
    sent, started = 0, time.monotonic()
    while (now := time.monotonic()) < until:
        due = int((now - started) * rate) - sent
        if due > 0:
            pipe = client.pipeline(transaction=False)
            for i in range(sent, sent + due):
                task = {"prompt": prompt(i, "ours"), "model": FAMILY, "type": "classify"}
                pipe.xadd(keys.ingress, {**task, "max_tokens": str(MAX_TOKENS)})
            await asyncio.to_thread(pipe.execute)
            sent += due
        await asyncio.sleep(0.05)
    return sent


async def seed_design(
    base_url: str, rate: float, until: float, concurrency: int, stats: dict[str, int]
) -> None:
    """The seed: a semaphore of workers; on RateLimitError sleep 2^n and push back."""
    client = anthropic.AsyncAnthropic(api_key=SEED, base_url=base_url, max_retries=0)
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

    async def produce() -> None:
        sent, started = 0, time.monotonic()
        while (now := time.monotonic()) < until:
            for i in range(sent, int((now - started) * rate)):
                queue.put_nowait((i, 0))
                sent += 1
            await asyncio.sleep(0.05)

    async def work() -> None:
        while time.monotonic() < until:
            try:
                i, n = await asyncio.wait_for(queue.get(), 0.5)
            except TimeoutError:
                continue
            try:
                await client.messages.create(
                    model=MODEL, max_tokens=MAX_TOKENS,
                    messages=[{"role": "user", "content": prompt(i, "seed")}],
                )  # fmt: skip
                stats["ok"] += 1
            except anthropic.RateLimitError:
                stats["429"] += 1
                backoff = min(2**n, 60) * random.uniform(0.5, 1.0)
                await asyncio.sleep(min(backoff, max(0.0, until - time.monotonic())))
                queue.put_nowait((i, n + 1))
            except anthropic.APIError:
                stats["other"] += 1
                queue.put_nowait((i, n + 1))

    await asyncio.gather(produce(), *(work() for _ in range(concurrency)))
    await client.close()


def line(name: str, w: Window, args: argparse.Namespace) -> tuple[str, float, float]:
    minutes = w.seconds / 60
    calls = w.delta("requests")
    n429 = w.delta("status_429")
    out_pm = w.delta("output_tokens") / minutes
    in_pm = (w.delta("input_tokens") + w.delta("cache_creation_input_tokens")) / minutes
    ok_pm = w.delta("succeeded") / minutes
    use = {"rpm": ok_pm / args.rpm, "itpm": in_pm / args.itpm, "otpm": out_pm / args.otpm}
    binding = max(use, key=lambda k: use[k])
    share_429 = n429 / calls if calls else 0.0
    text = (
        f"{name:<6} calls {calls:>6,}  429s {n429:>6,} ({share_429:6.2%})  "
        f"ok/min {ok_pm:7,.0f} ({use['rpm']:6.1%} of RPM)  "
        f"in/min {in_pm:9,.0f} ({use['itpm']:6.1%})  out/min {out_pm:8,.0f} ({use['otpm']:6.1%})"
        f"  binding {binding.upper()} used {use[binding]:.1%}"
    )
    return text, use[binding], share_429


async def run(args: argparse.Namespace, logdir: Path) -> int:
    server = RedisServer(logdir / "redis").start()
    fake, base_url = start_fake(args, logdir)
    prefix = f"rl{uuid.uuid4().hex[:8]}"
    procs = start_ours(args, server.url, prefix, base_url, logdir)
    client = redis.Redis.from_url(server.url)
    try:
        await asyncio.sleep(3)  # workers connect and create their groups
        # 3x the binding limit's rate: output tokens per minute / mean output per task.
        rate = args.over * min(args.rpm, args.otpm / MEAN_OUTPUT, args.itpm / 170) / 60
        total_s = args.minutes * 60
        print(f"offering {rate:.1f} tasks/s to each client for {total_s:.0f} s "
              f"(limits RPM {args.rpm:,} ITPM {args.itpm:,} OTPM {args.otpm:,}, "
              f"latency median {args.latency_ms / 1000:.1f} s)", flush=True)  # fmt: skip
        until = time.monotonic() + total_s
        seed_stats = {"ok": 0, "429": 0, "other": 0}
        windows = {OURS: Window(), SEED: Window()}

        async def sample() -> None:
            await asyncio.sleep(min(60.0, total_s / 3))
            stats = fake_stats(base_url) or {}
            started = time.monotonic()
            for key, w in windows.items():
                w.start = key_counts(stats, key)
            while time.monotonic() < until - 1:
                await asyncio.sleep(min(30.0, max(0.1, until - 1 - time.monotonic())))
                stats = fake_stats(base_url) or {}
                for key, w in windows.items():
                    w.end, w.seconds = key_counts(stats, key), time.monotonic() - started
                parts = [
                    f"{key.split('-')[1]}: {w.delta('output_tokens') / w.seconds * 60:,.0f} "
                    f"out/min, {w.delta('status_429'):,} 429s"
                    for key, w in windows.items()
                ]
                elapsed = time.monotonic() - until + total_s
                print(f"  {elapsed:5.0f}s  " + "  ".join(parts), flush=True)

        keys = Keys(prefix)
        await asyncio.gather(
            feed_ours(client, keys, rate, until),
            seed_design(base_url, rate, until, args.seed_concurrency, seed_stats),
            sample(),
        )
        for p in procs:
            if p.poll() is not None:
                raise BenchError(f"a worker died:\n{log_tail(logdir / 'worker-0.log')}")
        print(f"\nsteady window: {windows[OURS].seconds:.0f} s (after the first "
              f"{min(60.0, total_s / 3):.0f} s)")  # fmt: skip
        ours, ours_use, ours_429 = line("ours", windows[OURS], args)
        seed, seed_use, seed_429 = line("seed", windows[SEED], args)
        print(ours)
        print(seed)
        target = "met" if ours_use >= 0.95 and ours_429 < 0.01 else "NOT met"
        print(f"target (binding limit >= 95% used, < 1% of calls 429): {target}")
        print(f"ours_binding_use={ours_use:.1%} ours_429={ours_429:.2%} "
              f"seed_binding_use={seed_use:.1%} seed_429={seed_429:.2%}")  # fmt: skip
        return 0
    finally:
        stop(procs, 10)
        stop([fake], 5)
        client.close()
        server.stop()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--rpm", type=int, default=1000)
    p.add_argument("--itpm", type=int, default=200_000)
    p.add_argument("--otpm", type=int, default=40_000)
    p.add_argument("--latency-ms", type=float, default=2000)
    p.add_argument("--sigma", type=float, default=0.3, help="lognormal sigma of the latency")
    p.add_argument("--over", type=float, default=3.0, help="offered load / binding limit")
    p.add_argument("--call-workers", type=int, default=2, help="claude-call processes (ours)")
    p.add_argument("--seed-concurrency", type=int, default=50, help="the seed's semaphore")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="bench-ratelimits-"))
    try:
        return asyncio.run(run(args, logdir))
    except BenchError as exc:
        print(f"error: {exc}\nlogs in {logdir}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
