"""`pipeline demo` as a user runs it: everything starts, tasks finish, nothing is left behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import psutil
import pytest
import redis

pytestmark = pytest.mark.chaos


def test_demo_runs_all_four_stages_and_cleans_up(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    before = {k for k in client.scan_iter(match="demo-*")}
    env = {**os.environ, "REDIS_URL": redis_url}
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
    # nothing left running (workers, fake API, private Redis), no keys left behind
    leftovers = [
        p.info["cmdline"] for p in psutil.process_iter(["cmdline", "create_time"])
        if p.info["create_time"] >= started - 1 and p.info["cmdline"]
        and any(x in " ".join(p.info["cmdline"]) for x in ("pipeline.cli", "pipeline.fake_claude"))
    ]  # fmt: skip
    assert not leftovers, leftovers
    assert {k for k in client.scan_iter(match="demo-*")} == before
    client.close()
