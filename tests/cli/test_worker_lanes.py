"""`pipeline worker --lane`: one model family's callers scale on their own (KEDA per family)."""

from __future__ import annotations

import time

import redis

from pipeline.runtime.keys import Keys
from tests.cli.conftest import cli_env
from tests.cli.test_cli import cli, one_error_line
from tests.helpers.workers import Workers, wait_until


def test_a_worker_runs_only_the_lanes_it_is_given(
    workers: Workers, rclient: redis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    proc = Workers(workers.env, workers.logdir, app="stages:app").start(
        ["claude-call"], args=["--lane", "haiku", "--lane", "opus"]
    )
    try:
        wait_until(lambda: "running claude-call" in proc.log(), 30, what="the worker to start")
        line = next(ln for ln in proc.log().splitlines() if "running claude-call" in ln)
        assert "claude-call[haiku]" in line and "claude-call[opus]" in line
        assert "sonnet" not in line
        lanes = ("haiku", "opus")
        # The groups are created as each lane's runner starts, just after the log line.
        wait_until(lambda: all(rclient.exists(keys.stream("call", ln)) for ln in lanes), 10,
                   what="both lanes' groups")  # fmt: skip
        groups = {ln: [g["name"] for g in rclient.xinfo_groups(keys.stream("call", ln))]
                  for ln in lanes}  # fmt: skip
        assert groups == {"haiku": [b"claude-call"], "opus": [b"claude-call"]}
        time.sleep(0.5)  # the sonnet lane would have been created by now
        assert not rclient.exists(keys.stream("call", "sonnet"))
    finally:
        proc.kill()


def test_an_unknown_lane_is_one_clear_line(redis_url: str, prefix: str) -> None:
    env = cli_env(redis_url, prefix)
    line = one_error_line(cli(env, "worker", "--stage", "claude-call", "--lane", "gpt"))
    assert "no lane 'gpt'" in line and "haiku" in line
    line = one_error_line(cli(env, "worker", "--stage", "router", "--lane", "haiku"))
    assert "no laned stage selected" in line
