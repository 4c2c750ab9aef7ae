"""`pipeline status --watch`: a few refreshes show what the test put in Redis; Ctrl-C exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from pipeline.cli.watch import Poll, percentile, view
from pipeline.runtime.keys import Keys
from pipeline.runtime.results import make_result
from pipeline.runtime.status import Status, StreamStatus
from tests.helpers.workers import wait_until

ROOT = Path(__file__).resolve().parents[2]


def cli_env(redis_url: str, prefix: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    return {**clean, "REDIS_URL": redis_url, "PIPELINE_PREFIX": prefix, "COLUMNS": "160"}


def watch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "status", "--app", "stages:app", "--watch",
            *args]  # fmt: skip


def fill(rclient: redis.Redis, keys: Keys) -> None:
    """5 tasks waiting, 2 dead letters, 30 cache hits of 40 lookups, 4 recent completions."""
    for i in range(5):
        rclient.xadd(keys.ingress, {"prompt": f"waiting {i}"})
    for i in range(2):
        rclient.xadd(keys.dlq, {"task_id": f"dead{i}", "error": "bad"})
    rclient.hset(keys.counters, mapping={"cache_hits": 30, "cache_misses": 10})
    for i, latency_ms in enumerate((1000, 2000, 3000, 40_000)):
        task_id = f"done{i}"
        rclient.hset(keys.result(task_id), mapping=make_result("completed", latency_ms=latency_ms))
        rclient.xadd(keys.done, {"id": task_id, "status": "completed"})


def test_watch_refreshes_show_the_numbers_in_redis(
    redis_url: str, prefix: str, rclient: redis.Redis
) -> None:
    fill(rclient, Keys(prefix))
    proc = subprocess.run(
        watch_cmd("--interval", "0.2", "--iterations", "3"),
        cwd=ROOT, env=cli_env(redis_url, prefix), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    frames = proc.stdout.split("pipeline status")[1:]
    assert len(frames) == 3, proc.stdout
    last = frames[-1]
    cache_check = next(line for line in last.splitlines() if line.startswith("cache-check"))
    assert cache_check.split()[2] == "5"  # backlog
    assert cache_check.split()[-1] == "0.0"  # out/s: nothing handed on between polls
    assert "DLQ: 2 entries" in last
    assert "75.0% overall" in last
    assert "p50 2.0s  p99 40.0s  (last 4 completions)" in last
    assert "out/s" in last


def test_ctrl_c_exits_cleanly_with_code_0(
    redis_url: str, prefix: str, rclient: redis.Redis
) -> None:
    fill(rclient, Keys(prefix))
    proc = subprocess.Popen(
        watch_cmd("--interval", "0.2"), cwd=ROOT, env=cli_env(redis_url, prefix),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        first = ""

        def refreshed() -> bool:
            nonlocal first
            first += proc.stdout.readline()  # type: ignore[union-attr]
            return "Ctrl-C exits" in first

        wait_until(refreshed, 30, every=0.0, what="a first refresh")
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def stream(stage: str, backlog: int) -> StreamStatus:
    return StreamStatus(stage=stage, lane=None, stream=f"p:{stage}", backlog=backlog, pending=0,
                        lag=0, consumers=1, oldest_pending_s=None, delayed=0,
                        group_exists=True)  # fmt: skip


def a_poll(at_s: float, added: int, backlog: int, hits: int, misses: int, calls: int,
           throttled: int) -> Poll:  # fmt: skip
    status = Status(streams=[stream("router", backlog)], dlq=0, paused=[],
                    server_time_ms=int(at_s * 1000))  # fmt: skip
    return Poll(status=status, at_s=at_s, entries_added={"p:router": added}, cache_hits=hits,
                cache_misses=misses, calls=calls, throttled_429=throttled, latencies_ms=[],
                spend_today_usd=None)  # fmt: skip


def test_rates_come_from_the_difference_between_two_polls() -> None:
    before = a_poll(100.0, added=1000, backlog=300, hits=10, misses=10, calls=50, throttled=0)
    # 2 s later: 400 more added, backlog down by 100 -> 500 handed on, 250/s
    after = a_poll(102.0, added=1400, backlog=200, hits=40, misses=20, calls=150, throttled=5)
    shown = view(after, before)
    assert shown.rates[0].per_s == 250.0
    assert shown.cache_hit_rate == 0.75  # 30 of 40 lookups in the interval
    assert shown.cache_hit_rate_total == 40 / 60
    assert shown.rate_429 == 0.05
    first = view(before, None)
    assert first.rates[0].per_s is None and first.cache_hit_rate is None


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([7], 99) == 7
    assert percentile([], 50) is None
