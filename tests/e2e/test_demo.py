"""`pipeline demo` as a user runs it: everything starts, tasks finish, nothing is left behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid

import psutil
import pytest
import redis

pytestmark = pytest.mark.chaos


def test_demo_runs_all_four_stages_and_cleans_up(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    before = {k for k in client.scan_iter(match="demo-*")}
    mark = uuid.uuid4().hex  # inherited by what the demo starts: tells its processes apart
    env = {**os.environ, "REDIS_URL": redis_url, "PIPELINE_TEST_RUN": mark}
    env.pop("ANTHROPIC_API_KEY", None)
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo", "--tasks", "40"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "submitted 40  completed 40  failed 0" in out, out
    cached = int(re.search(r"from cache (\d+)", out).group(1))  # type: ignore[union-attr]
    assert 1 <= cached <= 10  # the repeated quarter, less any answer cut at max_tokens
    assert "claude-haiku" in out and "claude-sonnet" in out
    # nothing this demo started is left running (workers, fake API), no keys left behind;
    # other checkouts' processes on a shared machine are not ours to count
    leftovers = [
        p.info["cmdline"] for p in psutil.process_iter(["cmdline", "create_time"])
        if p.info["create_time"] >= started - 1 and _started_by(p, mark)
    ]  # fmt: skip
    assert not leftovers, leftovers
    assert {k for k in client.scan_iter(match="demo-*")} == before
    client.close()


def _started_by(process: psutil.Process, mark: str) -> bool:
    try:
        return process.environ().get("PIPELINE_TEST_RUN") == mark
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
