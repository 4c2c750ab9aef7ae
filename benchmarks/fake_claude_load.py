"""Load test of the fake Claude server: N concurrent real-SDK calls against it.

The fake runs in its own process (`python -m pipeline.fake_claude`) so its CPU time can be
measured apart from the client's. Prints connect errors, other errors, the maximum number of
requests the server had in flight at once, the server's CPU ms per call, and last
`fake_inflight_max=<n>`.

    python benchmarks/fake_claude_load.py                # 2000 calls, lognormal median 5 s
    python benchmarks/fake_claude_load.py -n 500 --median-ms 1000 --sigma 0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx2
import psutil

ROOT = Path(__file__).resolve().parents[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    """Launch the fake on a free port and read its URL from the first line it prints."""
    command = [
        sys.executable, "-m", "pipeline.fake_claude", "--port", "0",
        "--latency-ms", str(args.median_ms), "--latency-sigma", str(args.sigma),
        "--latency-cap-ms", str(args.cap_ms), "--seed", "1",
    ]  # fmt: skip
    if args.no_uvloop:
        command.append("--no-uvloop")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("fake-claude listening on "):
        process.kill()
        raise SystemExit(f"fake did not start: {line!r}")
    return process, line.rsplit(" ", 1)[1]


async def fire(base_url: str, n: int) -> tuple[list[Any], list[float], float]:
    """N concurrent calls; returns results (or exceptions), per-call seconds, wall seconds."""
    http_client = anthropic.DefaultAioHttpClient(
        limits=httpx2.Limits(max_connections=n + 100, max_keepalive_connections=n + 100)
    )
    durations: list[float] = []

    async def one(claude: anthropic.AsyncAnthropic, i: int) -> Any:
        started = time.perf_counter()
        try:
            return await claude.messages.create(
                model="claude-haiku-5-5",
                max_tokens=256,
                messages=[{"role": "user", "content": f"load test task {i}"}],
            )
        finally:
            durations.append(time.perf_counter() - started)

    async with anthropic.AsyncAnthropic(
        base_url=base_url, api_key="sk-bench", max_retries=0, http_client=http_client
    ) as claude:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(claude, i) for i in range(n)), return_exceptions=True)
        return list(results), durations, time.perf_counter() - started


async def fake_stats(base_url: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base_url}/_fake/stats") as response,
    ):
        stats: dict[str, Any] = await response.json()
        return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="concurrent calls")
    parser.add_argument("--median-ms", type=float, default=5000.0, help="latency median")
    parser.add_argument("--sigma", type=float, default=0.5, help="lognormal sigma (0 = fixed)")
    parser.add_argument("--cap-ms", type=float, default=30_000.0, help="latency cap")
    parser.add_argument("--no-uvloop", action="store_true", help="server on plain asyncio")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.n + 1024 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.n + 1024, hard))

    process, base_url = start_server(args)
    try:
        server = psutil.Process(process.pid)
        before = server.cpu_times()
        results, durations, wall = asyncio.run(fire(base_url, args.n))
        after = server.cpu_times()
        stats = asyncio.run(fake_stats(base_url))
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)

    errors = [r for r in results if isinstance(r, BaseException)]
    connect_errors = sum(isinstance(e, anthropic.APIConnectionError) for e in errors)
    kinds = Counter(type(e).__name__ for e in errors)
    cpu_s = (after.user - before.user) + (after.system - before.system)
    ok = len(results) - len(errors)
    print(f"fake: {base_url} (uvloop={'no' if args.no_uvloop else 'if installed'})")
    print(f"calls={args.n} ok={ok} connect_errors={connect_errors} other_errors={dict(kinds)}")
    print(f"wall_s={wall:.2f} call_s p50={statistics.median(durations):.2f} "
          f"max={max(durations):.2f}")  # fmt: skip
    print(f"server_status={stats['by_status']} distinct_requests={stats['distinct_requests']}")
    print(f"server_cpu_s={cpu_s:.2f} server_cpu_ms_per_call={1000 * cpu_s / args.n:.3f}")
    print(f"fake_inflight_max={stats['inflight_max']}")


if __name__ == "__main__":
    main()
