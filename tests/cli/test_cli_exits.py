"""Exit codes (docs/CLI.md), one-line errors with a hint, and saying why nothing finishes:
the `pipeline` command run as a user runs it (a subprocess), against a real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis

from pipeline.claude.settings import Settings
from pipeline.cli.exits import Code
from pipeline.runtime.keys import Keys
from pipeline.runtime.results import make_result
from tests.cli.test_cli import ROOT, cli, dead_letter, one_error_line
from tests.conftest import StartFake
from tests.helpers.workers import Workers, wait_until


def test_the_codes_are_the_documented_ones() -> None:
    table = (ROOT / "docs/CLI.md").read_text()
    for code in Code:
        assert f"\n| {code.value} |" in table, code
    assert [c.value for c in Code] == [0, 1, 2, 3, 4, 130]


# ---- a task that failed: exit 1, whatever shows it --------------------------------------------


@pytest.fixture
def stage_workers(workers: Workers, env: dict[str, str]) -> Iterator[Workers]:
    """Workers of the real four stages (`stages:app`) with this test's Redis and prefix,
    killed when the test ends."""
    started = Workers({**workers.env, **env}, workers.logdir, app="stages:app")
    yield started
    started.stop_all()


@pytest.fixture
def app_workers(workers: Workers, env: dict[str, str]) -> Iterator[Workers]:
    """Workers of the tests' own app with this test's Redis and prefix, killed afterwards."""
    started = Workers({**workers.env, **env}, workers.logdir)
    yield started
    started.stop_all()


def test_a_failed_task_exits_1_everywhere(
    env: dict[str, str], stage_workers: Workers, start_fake: StartFake
) -> None:
    fake = start_fake()
    stage_workers.start(extra_env={"ANTHROPIC_BASE_URL": fake.base_url,
                                   "ANTHROPIC_API_KEY": "k"})  # fmt: skip
    waited = cli(env, "submit", "hi", "--model", "gpt-4", "--id", "t-gpt", "--wait", "30",
                 timeout=60)  # fmt: skip
    assert waited.returncode == Code.FAILED, (waited.stdout, waited.stderr)
    assert "failed" in waited.stdout and "gpt-4" in waited.stdout  # the result is printed

    shown = cli(env, "result", "t-gpt")
    assert shown.returncode == Code.FAILED and "failed" in shown.stdout
    as_json = cli(env, "result", "t-gpt", "--json")
    assert as_json.returncode == Code.FAILED
    data = json.loads(as_json.stdout)
    assert data["status"] == "failed" and data["id"] == "t-gpt"
    assert type(data["attempts"]) is int and type(data["cached"]) is bool
    assert type(data["cost_usd"]) is float and type(data["latency_ms"]) is int

    listed = json.loads(cli(env, "dlq", "list", "--json").stdout)
    [letter] = listed
    assert letter["task_id"] == "t-gpt" and letter["stage"] == "router"
    assert type(letter["deliveries"]) is int and type(letter["attempts"]) is int
    assert type(letter["age_s"]) is float
    # `dlq show` takes the task id as well as the DLQ entry id
    by_task = cli(env, "dlq", "show", "t-gpt")
    assert by_task.returncode == 0, by_task.stderr
    assert letter["dlq_id"] in by_task.stdout and "gpt-4" in by_task.stdout
    full = json.loads(cli(env, "dlq", "show", letter["dlq_id"], "--json").stdout)
    assert full["task_id"] == "t-gpt" and "unknown model 'gpt-4'" in full["error"]
    assert full["fields"]["id"] == "t-gpt" and full["traceparent"] is None
    assert full["letters_of_task"] == 1 and full["result_kept"] is False


def test_result_exit_codes_follow_the_status(
    env: dict[str, str], prefix: str, rclient: redis.Redis
) -> None:
    keys = Keys(prefix)
    rclient.hset(keys.result("ok"), mapping=make_result("completed", output="yes"))
    rclient.hset(keys.result("bad"), mapping=make_result("failed", error="router: boom"))
    assert cli(env, "result", "ok").returncode == Code.OK
    assert cli(env, "result", "bad").returncode == Code.FAILED
    assert cli(env, "result", "bad", "--json").returncode == Code.FAILED
    line = one_error_line(cli(env, "result", "nothing"), code=Code.TIMEOUT)
    assert "no result for task 'nothing' yet" in line and "--wait" in line


# ---- no result in time: exit 3, and why ---------------------------------------------------------


def test_no_worker_is_named_on_a_timeout(env: dict[str, str]) -> None:
    proc = cli(env, "submit", "hi", "--wait", "1")
    line = one_error_line(proc, code=Code.TIMEOUT)
    assert line.startswith("submitted ") and "no result within 1s" in line
    assert "no worker is consuming any stage" in line and "pipeline worker --all" in line
    line = one_error_line(cli(env, "result", "t-x", "--wait", "1"), code=Code.TIMEOUT)
    assert "no result for task 't-x' within 1s: no worker is consuming" in line


def test_a_missing_api_key_is_named_on_a_timeout(
    env: dict[str, str], stage_workers: Workers, rclient: redis.Redis, prefix: str
) -> None:
    stage_workers.start()  # no ANTHROPIC_API_KEY (tests never see one)
    proc = cli(env, "submit", "hi", "--id", "t-nokey", "--wait", "10", timeout=60)
    line = one_error_line(proc, code=Code.TIMEOUT)
    assert "no result within 10s: claude-call is paused (no API key)" in line, line
    assert "set ANTHROPIC_API_KEY" in line and "ANTHROPIC_BASE_URL" in line
    assert "pipeline fake-claude" in line
    assert rclient.exists(Keys(prefix).pause("claude-call"))
    line = one_error_line(cli(env, "result", "t-nokey", "--wait", "1"), code=Code.TIMEOUT)
    assert "claude-call is paused (no API key)" in line


def test_a_stage_without_consumers_is_named(
    env: dict[str, str], app_workers: Workers, rclient: redis.Redis, prefix: str
) -> None:
    """Workers run ingest and finish but not work: the task waits in work's stream."""
    keys = Keys(prefix)
    proc = app_workers.start(["ingest", "finish"])
    wait_until(lambda: "running" in proc.log(), 30, what="the worker to start")
    rclient.xadd(keys.ingress, {"n": "1", "id": "t-w"})
    wait_until(lambda: rclient.xlen(keys.stream("work")) == 1, 30, what="the hand-off to work")
    line = one_error_line(
        cli(env, "result", "t-w", "--wait", "1", "--app", "tests.apps:app"), code=Code.TIMEOUT
    )
    assert "no worker is consuming work " in line, line
    assert "ingest" not in line.split("consuming")[1]


def test_an_idle_live_worker_is_not_called_dead(
    app_workers: Workers, settings: Settings, rclient: redis.Redis, prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A worker blocked on empty streams for longer than the liveness window is alive: before
    Redis 7.2 its consumers' `idle` grows all the same (it counts from the last read that
    returned entries), and `result --wait` told the user to start a worker."""
    from pipeline.cli import diagnose
    from tests.apps import app as test_app

    keys = Keys(prefix)
    proc = app_workers.start()
    wait_until(lambda: "running" in proc.log(), 30, what="the worker to start")
    rclient.xadd(keys.ingress, {"n": "1", "id": "t-idle"})
    wait_until(lambda: rclient.exists(keys.result("t-idle")), 30, what="the task to finish")
    monkeypatch.setattr(diagnose, "LIVE_WITHIN_MS", 200)
    block_ms = settings.runtime.block_ms
    time.sleep(3 * block_ms / 1000 + 0.5)  # every consumer now idle past the window

    async def why() -> str | None:
        aredis = Redis.from_url(settings.redis.url)
        try:
            return await diagnose.why_no_result(aredis, keys, test_app, settings)
        finally:
            await aredis.aclose()

    assert asyncio.run(why()) is None  # alive, just idle: nothing to tell
    proc.signal(signal.SIGTERM)  # now gone: its name is let go, and it is called dead
    assert proc.proc.wait(30) == 0
    assert "no worker is consuming any stage" in (asyncio.run(why()) or "")


# ---- dlq: codes, --yes off a terminal -------------------------------------------------------


def test_dlq_exit_codes(env: dict[str, str], prefix: str, rclient: redis.Redis) -> None:
    keys = Keys(prefix)
    first = dead_letter(rclient, keys, "t-1", "boom")
    assert cli(env, "dlq", "list").returncode == Code.OK
    assert cli(env, "dlq", "show", first).returncode == Code.OK
    line = one_error_line(cli(env, "dlq", "show", "9-9"), code=Code.FAILED)
    assert "'9-9'" in line and "pipeline dlq list" in line
    assert cli(env, "dlq", "show", "no-such-task").returncode == Code.FAILED
    assert cli(env, "dlq", "replay", "9-9", "--yes").returncode == Code.FAILED
    assert cli(env, "dlq", "purge", "9-9", "--yes").returncode == Code.FAILED
    line = one_error_line(cli(env, "dlq", "replay", "--yes"))  # neither ids nor --all
    assert line.startswith("error: usage: ") and "give DLQ ids or --all" in line
    assert line.endswith("; see python -m pipeline.cli dlq replay --help")


@pytest.mark.parametrize("command", ["replay", "purge"])
def test_dlq_off_a_terminal_needs_yes(
    env: dict[str, str], prefix: str, rclient: redis.Redis, command: str
) -> None:
    keys = Keys(prefix)
    dlq_id = dead_letter(rclient, keys, "t-1", "boom")
    for stdin in ("", "y\n"):  # nothing to read, or a piped answer: both are scripts
        line = one_error_line(cli(env, "dlq", command, dlq_id, stdin=stdin))
        assert f"dlq {command} asks for confirmation" in line and "pass --yes" in line
        assert "Aborted" not in line
    assert rclient.xlen(keys.dlq) == 1
    assert cli(env, "dlq", command, dlq_id, "-y").returncode == Code.OK
    assert rclient.xlen(keys.dlq) == 0


def on_a_terminal(env: dict[str, str], *args: str, answer: str) -> tuple[int, str]:
    """Run `pipeline ARGS` with a pseudo-terminal as stdin, answering its prompt."""
    main, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, stdin=secondary,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        os.write(main, answer.encode())
        out, err = proc.communicate(timeout=30)
    finally:
        os.close(main)
        os.close(secondary)
    return proc.returncode, out + err


def test_dlq_on_a_terminal_asks(env: dict[str, str], prefix: str, rclient: redis.Redis) -> None:
    keys = Keys(prefix)
    dlq_id = dead_letter(rclient, keys, "t-1", "boom")
    code, output = on_a_terminal(env, "dlq", "purge", dlq_id, answer="n\n")
    assert code == Code.FAILED and "not confirmed" in output and rclient.xlen(keys.dlq) == 1
    code, output = on_a_terminal(env, "dlq", "replay", dlq_id, answer="y\n")
    assert code == Code.OK and "replayed 1" in output and rclient.xlen(keys.dlq) == 0


# ---- cost -------------------------------------------------------------------------------------


def test_cost_exit_codes(env: dict[str, str]) -> None:
    assert cli(env, "cost").returncode == Code.OK
    assert cli(env, "cost", "--json").returncode == Code.OK
    line = one_error_line(cli(env, "cost", "--day", "someday"))
    assert line.startswith("error: usage: ") and "'someday' is not a day" in line
    line = one_error_line(cli(env, "cost", "--by", "colour"))
    assert "'colour': use model or type" in line


# ---- one line, the right label, a hint ----------------------------------------------------------


def test_tracing_without_opentelemetry_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    """The worker's one decision, reused by submit: not a 15-frame ModuleNotFoundError."""
    shadow = tmp_path / "opentelemetry"  # an install without the [otlp] extra
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'x'\")\n")
    otel = {**env, "PYTHONPATH": str(tmp_path), "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}
    for command in (["submit", "hi"], ["worker", "--app", "tests.apps:app", "--all"]):
        line = one_error_line(cli(otel, *command))
        assert line.startswith("error: config: OTEL_*: tracing needs pip install"), line
        assert "claude-pipeline[otlp]" in line


def test_a_taken_port_is_one_line(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(cli(env, "fake-claude", "--port", str(port)))
    assert line.startswith(f"error: port: cannot listen on 127.0.0.1:{port}: "), line
    assert "config" not in line and "--port 0" in line


def test_a_missing_config_file_is_labelled_once(env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    line = one_error_line(cli(env, "status", "--config", str(missing)))
    assert line.startswith(f"error: config: file not found: {missing}"), line
    assert "config: config:" not in line and "PIPELINE_CONFIG" in line


def test_usage_errors_are_one_line(env: dict[str, str]) -> None:
    line = one_error_line(cli(env, "submit", "hi", "--wait", "0"))
    assert line.startswith("error: usage: ") and "--wait must be more than 0 seconds" in line
    assert line.endswith("; see python -m pipeline.cli submit --help"), line
    line = one_error_line(cli(env, "worker", "--app", "tests.apps:app", "--stage", "nope"))
    assert line.startswith("error: --stage: no stage 'nope' (stages: ingest, work, finish)")
    assert "error: usage: " in one_error_line(cli(env, "dlq", "list", "--count", "0"))
    assert "error: usage: " in one_error_line(cli(env, "no-such-command"))


def test_a_bare_command_still_shows_its_help(env: dict[str, str]) -> None:
    for args in ([], ["dlq"]):
        proc = cli(env, *args)
        assert "Usage:" in proc.stdout + proc.stderr and "error:" not in proc.stderr


# ---- the demo -----------------------------------------------------------------------------------


def test_the_demo_stops_at_once_when_a_worker_dies(env: dict[str, str]) -> None:
    """A worker that cannot start (its metrics port is taken) ends the demo in seconds, not
    after the 120 s a task's result is waited for, with the worker's last log lines."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        proc = cli({**env, "PIPELINE_METRICS__PORT": str(port)}, "demo", "--tasks", "5",
                   "--workers", "1", timeout=90)  # fmt: skip
    took = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode == Code.FAILED, output
    assert took < 60, took
    assert "worker 0" in output and "exited with 2" in output
    assert "metrics.port" in output  # its log's last lines
    assert "demo stopped" in output and "Traceback" not in output
