"""The `pipeline` command, run as operators run it (a subprocess) against a real Redis."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.runtime.dlq import dlq_fields
from pipeline.runtime.keys import Keys
from pipeline.runtime.results import make_result
from pipeline.runtime.wire import ENVELOPE_FIELD
from tests.helpers.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]

COMMANDS = [
    [],
    ["worker"],
    ["submit"],
    ["result"],
    ["status"],
    ["fake-claude"],
    ["dlq"],
    ["dlq", "list"],
    ["dlq", "show"],
    ["dlq", "replay"],
    ["dlq", "purge"],
]


def cli(
    env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """Exit `code` (2: usage or configuration), and stderr is exactly one line: no traceback."""
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def dead_letter(rclient: redis.Redis, keys: Keys, task_id: str, error: str) -> str:
    """A DLQ entry and its failed result, as the runtime writes them."""
    fields = dlq_fields(
        task_id=task_id,
        stage="router",
        stream=keys.stream("route"),
        entry_id="1-0",
        error=error,
        deliveries=5,
        attempts=2,
        fields={"prompt": f"prompt of {task_id}", "metadata": '{"team":"search","n":[1,2]}'},
        traceparent=None,
        tracestate=None,
        max_field_bytes=1024,
    )
    rclient.hset(keys.result(task_id), mapping=make_result("failed", error=error))
    return str(rclient.xadd(keys.dlq, fields).decode())  # type: ignore[union-attr]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "pipeline")
def test_help_for_every_command(command: list[str]) -> None:
    run = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert run.exit_code == 0, run.output
    assert "Usage:" in run.output
    assert "--help" in run.output


def test_every_option_has_help_text() -> None:
    import typer.main

    group = typer.main.get_command(app)

    def walk(command: object, path: str) -> None:
        for param in getattr(command, "params", []):
            if param.param_type_name == "option":
                assert getattr(param, "help", None), f"{path} {param.opts} has no help"
        for name, sub in getattr(command, "commands", {}).items():
            assert sub.help, f"{path} {name} has no help"
            walk(sub, f"{path} {name}")

    walk(group, "pipeline")


def _commands() -> list[tuple[str, object]]:
    import typer.main

    found: list[tuple[str, object]] = []

    def walk(command: object, path: str) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            found.append((f"{path} {name}".strip(), sub))
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "")
    return found


def test_help_paragraphs_wrap_to_the_terminal() -> None:
    """No line break inside a paragraph of a command's help: typer keeps them, and a
    docstring's lines (wrapped at 92 in the source) broke mid-sentence at 80 columns."""
    for path, command in _commands():
        text = getattr(command, "help", "") or ""
        for paragraph in text.split("\n\n"):
            assert "\n" not in paragraph, f"pipeline {path}: {paragraph!r}"
    run = CliRunner().invoke(app, ["status", "--help"], env={"COLUMNS": "80"})
    assert "oldest pending age and retries waiting; the DLQ;" in " ".join(run.output.split())


def test_every_command_with_json_is_in_the_cli_docs() -> None:
    """docs/CLI.md's `--json` section names every command that takes --json."""
    doc = (ROOT / "docs/CLI.md").read_text().split("## `--json`", 1)[1].split("\n## ", 1)[0]
    named = " ".join(doc.split())
    for path, command in _commands():
        options = [o for p in getattr(command, "params", []) for o in getattr(p, "opts", [])]
        if "--json" in options:
            assert f"`{path}`" in named or f"`{path} " in named, f"{path} takes --json"


# ---- submit and result -----------------------------------------------------------------------


def test_submit_and_result_round_trip(
    env: dict[str, str], prefix: str, rclient: redis.Redis
) -> None:
    keys = Keys(prefix)
    proc = cli(env, "submit", "Classify: great product", "--type", "classify", "--model",
               "haiku", "--max-tokens", "50", "--no-cache", "--ttl", "120",
               "--metadata", '{"user": "ann"}')  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    task_id = proc.stdout.strip()
    [(_, fields)] = rclient.xrange(keys.ingress)
    assert {k.decode(): v.decode() for k, v in fields.items()} == {
        "prompt": "Classify: great product",
        "model": "haiku",
        "max_tokens": "50",
        "type": "classify",
        "cache": "false",
        "ttl": "120",
        "metadata": '{"user": "ann"}',  # JSON text is sent as given, as by XADD
        "id": task_id,  # assigned by the client, so that the task can be sent again safely
    }

    missing = one_error_line(cli(env, "result", task_id), code=3)  # no result yet
    assert f"no result for task '{task_id}' yet" in missing

    result = make_result("completed", output="positive", model="claude-haiku", metadata="{}")
    rclient.hset(keys.result(task_id), mapping=result)
    shown = cli(env, "result", task_id)
    assert shown.returncode == 0, shown.stderr
    assert "positive" in shown.stdout and "completed" in shown.stdout
    as_json = cli(env, "result", task_id, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {
        **{"id": task_id, **result},  # typed: numbers, flags and metadata are not strings
        **{name: 0 for name in ("input_tokens", "output_tokens", "cache_read_input_tokens",
                                "cache_creation_input_tokens", "attempts", "call_ms")},
        "cost_usd": 0.0, "cached": False, "metadata": {}, "latency_ms": None,
        "content": [], "usage": {},  # the API's JSON, as JSON
    }  # fmt: skip


def test_submit_sends_the_messages_parameters(
    env: dict[str, str], prefix: str, rclient: redis.Redis, tmp_path: Path
) -> None:
    tools = [{"name": "lookup", "input_schema": {"type": "object"}}]
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    (tmp_path / "params.json").write_text('{"inference_geo": "us"}')
    proc = cli(env, "submit", "Find order 42", "--tools", f"@{tmp_path / 'tools.json'}",
               "--stop", "END", "--stop", "STOP", "--thinking-budget", "2048",
               "--field", 'tool_choice={"type": "auto"}', "--field", "top_p=0.95",
               "--field", f"params=@{tmp_path / 'params.json'}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [(_, raw)] = rclient.xrange(Keys(prefix).ingress)
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    assert json.loads(fields["tools"]) == tools
    assert json.loads(fields["stop_sequences"]) == ["END", "STOP"]
    assert json.loads(fields["thinking"]) == {"type": "enabled", "budget_tokens": 2048}
    assert json.loads(fields["tool_choice"]) == {"type": "auto"}
    assert (fields["top_p"], fields["params"]) == ("0.95", '{"inference_geo": "us"}')
    bad = one_error_line(cli(env, "submit", "x", "--field", "top_k=0"), code=2)
    assert "top_k: must be a whole number of at least 1" in bad
    unknown = one_error_line(cli(env, "submit", "x", "--field", "colour=red"), code=2)
    assert "colour" in unknown
    twice = cli(env, "submit", "x", "--stop", "A", "--field", "stop_sequences=[]")
    assert twice.returncode == 2 and "given twice" in twice.stderr


def test_submit_wait_prints_the_result(
    env: dict[str, str], prefix: str, rclient: redis.Redis
) -> None:
    keys = Keys(prefix)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "submit", "hi", "--id", "waited", "--wait", "20",
         "--json"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for _ in range(200):  # until the task is in the ingress
            if rclient.xlen(keys.ingress):
                break
            subprocess.run(["sleep", "0.05"], check=True)
        rclient.hset(keys.result("waited"), mapping=make_result("completed", output="hello"))
        rclient.xadd(keys.done, {"id": "waited", "status": "completed"})
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert json.loads(out)["output"] == "hello"


def test_submit_rejects_bad_input_in_one_line(env: dict[str, str]) -> None:
    line = one_error_line(cli(env, "submit", "hi", "--metadata", "{nope"))
    assert "metadata: not valid JSON" in line
    line = one_error_line(cli(env, "submit", "hi", "--temperature", "3"))
    assert "temperature: must be a number from 0 to 1" in line


def test_submit_file_reports_bad_lines_and_submits_the_rest(
    env: dict[str, str], prefix: str, rclient: redis.Redis, tmp_path: Path
) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "one", "type": "classify"}),
                "{not json",
                json.dumps({"prompt": "two", "id": "mine-2"}),
                json.dumps({"promt": "typo"}),
                "",
                json.dumps({"messages": [{"role": "user", "content": "three"}], "ttl": "60"}),
                json.dumps(["not", "an", "object"]),
            ]
        )
        + "\n"
    )
    ids_file = tmp_path / "ids.txt"
    proc = cli(env, "submit", "--file", str(tasks), "--out", str(ids_file))
    assert proc.returncode == 1, proc.stderr
    assert "line 2:" in proc.stderr
    assert "line 4: unknown field 'promt'" in proc.stderr
    assert "line 7: a line must be a JSON object" in proc.stderr
    assert "3 line(s) rejected; 3 task(s) were submitted" in proc.stderr
    assert "Traceback" not in proc.stderr
    ids = ids_file.read_text().split()
    entries = rclient.xrange(Keys(prefix).ingress)
    assert len(ids) == len(entries) == 3
    assert ids[1] == "mine-2"
    assert ids[0] == entries[0][1][b"id"].decode()  # an id the client assigned


def test_submit_file_prints_ids_without_out(env: dict[str, str], tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"p{n}", "id": f"id{n}"}) + "\n"
                             for n in range(1200)))  # fmt: skip
    proc = cli(env, "submit", "-f", str(tasks))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [f"id{n}" for n in range(1200)]


def test_submit_file_stops_on_backpressure(env: dict[str, str], tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"p{n}"}) + "\n" for n in range(1200)))
    proc = cli({**env, "PIPELINE_INGRESS__MAX_BACKLOG": "700"}, "submit", "-f", str(tasks))
    line = one_error_line(proc, code=4)  # unavailable: the same command may work later
    assert "stopped at line 501" in line and "ingress.max_backlog (700)" in line
    assert "500 task(s) were submitted" in line
    assert len(proc.stdout.split()) == 500


# ---- status ---------------------------------------------------------------------------------


def test_status_shows_every_stage(env: dict[str, str], prefix: str, rclient: redis.Redis) -> None:
    keys = Keys(prefix)
    rclient.xadd(keys.ingress, {"n": "1"})
    rclient.xadd(keys.ingress, {"n": "2"})
    rclient.xgroup_create(keys.ingress, "ingest", id="0")
    rclient.xreadgroup("ingest", "c1", {keys.ingress: ">"}, count=1)
    rclient.set(keys.pause("work"), "API key refused (401)", px=60_000)
    rclient.zadd(keys.delayed(keys.stream("work")), {b"retry-me": 1})
    dead_letter(rclient, keys, "t-dead", "boom")
    proc = cli(env, "status", "--app", "tests.apps:app")
    assert proc.returncode == 0, proc.stderr
    stages = ("ingest", "work", "finish")
    rows = {ln.split()[0]: ln.split() for ln in proc.stdout.splitlines() if ln.startswith(stages)}
    assert list(rows) == list(stages)
    # stage, lane, backlog, pending, consumers, … (the lag is in --json: backlog less pending)
    assert rows["ingest"][:5] == ["ingest", "-", "2", "1", "1"]
    assert rows["work"][4] == "none"  # no consumer group yet
    assert "DLQ: 1 entries" in proc.stdout
    assert "paused: work - API key refused (401)" in proc.stdout

    data = json.loads(cli(env, "status", "--app", "tests.apps:app", "--json").stdout)
    assert [s["stage"] for s in data["streams"]] == ["ingest", "work", "finish"]
    ingest, work, _ = data["streams"]
    assert ingest["pending"] == 1 and 0 <= ingest["oldest_pending_s"] < 60
    if int(str(rclient.info("server")["redis_version"]).split(".")[0]) >= 7:
        assert ingest["lag"] == 1  # XINFO GROUPS has it from Redis 7
    assert type(ingest["backlog"]) is int and type(ingest["group_exists"]) is bool
    assert work["delayed"] == 1 and not work["group_exists"]
    assert data["dlq"] == 1
    assert data["paused"][0]["stage"] == "work" and 0 < data["paused"][0]["remaining_s"] <= 60


def test_status_of_an_unknown_app_is_one_line(env: dict[str, str]) -> None:
    line = one_error_line(cli(env, "status", "--app", "no_such_module:app"))
    assert "cannot import 'no_such_module'" in line


# ---- dlq ------------------------------------------------------------------------------------


def test_dlq_list_show_replay_purge(env: dict[str, str], prefix: str, rclient: redis.Redis) -> None:
    keys = Keys(prefix)
    first = dead_letter(rclient, keys, "t-1", "router: unknown model 'gpt'")
    second = dead_letter(rclient, keys, "t-2", "x" * 500)
    third = dead_letter(rclient, keys, "t-3", "over max deliveries")

    listed = cli(env, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    assert all(i in listed.stdout for i in (first, second, third))
    assert "unknown model 'gpt'" in listed.stdout
    assert "x" * 500 not in listed.stdout  # errors are cut to the terminal's width
    assert any(ln.endswith("x…") and len(ln) <= 200 for ln in listed.stdout.splitlines())

    shown = cli(env, "dlq", "show", first)
    assert shown.returncode == 0, shown.stderr
    assert "t-1" in shown.stdout and "router" in shown.stdout
    assert '"team": "search"' in shown.stdout  # original JSON fields pretty-printed
    assert cli(env, "dlq", "show", "1-1").returncode == 1

    replayed = cli(env, "dlq", "replay", first, "--yes")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1" in replayed.stdout
    [(_, fields)] = rclient.xrange(keys.ingress)
    assert list(fields) == [ENVELOPE_FIELD]
    assert not rclient.exists(keys.result("t-1"))
    assert rclient.xlen(keys.dlq) == 2

    gone = cli(env, "dlq", "purge", second, "-y")
    assert gone.returncode == 0 and "purged 1" in gone.stdout
    assert rclient.xlen(keys.dlq) == 1
    assert cli(env, "dlq", "purge", "--all", "--yes").returncode == 0
    assert rclient.xlen(keys.dlq) == 0


def test_dlq_replay_all_and_missing_ids(
    env: dict[str, str], prefix: str, rclient: redis.Redis
) -> None:
    keys = Keys(prefix)
    for n in range(3):
        dead_letter(rclient, keys, f"t-{n}", "boom")
    proc = cli(env, "dlq", "replay", "--all", "--yes")
    assert proc.returncode == 0 and "replayed 3" in proc.stdout
    assert rclient.xlen(keys.dlq) == 0 and rclient.xlen(keys.ingress) == 3
    missing = cli(env, "dlq", "replay", "5-5", "--yes")
    assert missing.returncode == 1 and "not found: 5-5" in missing.stderr
    assert cli(env, "dlq", "replay", "--yes").returncode == 2  # neither ids nor --all
    assert cli(env, "dlq", "show", "not-an-id").returncode == 1  # a task id, without letters


# ---- errors are one line --------------------------------------------------------------------


def test_a_bad_config_value_names_the_field(env: dict[str, str], tmp_path: Path) -> None:
    line = one_error_line(cli({**env, "PIPELINE_RUNTIME__LEASE_MS": "soon"}, "submit", "hi"))
    assert "runtime.lease_ms" in line
    config = tmp_path / "pipeline.toml"
    config.write_text("[runtime]\nconcurrency = 0\n")
    line = one_error_line(cli(env, "status", "--app", "tests.apps:app", "--config", str(config)))
    assert "runtime.concurrency" in line


@pytest.mark.parametrize(
    "command",
    [
        ["submit", "hi"],
        ["result", "x"],
        ["status", "--app", "tests.apps:app"],
        ["dlq", "list"],
        ["dlq", "show", "1-1"],
        ["cost"],
    ],
    ids=lambda c: " ".join(c[:2]) if c[0] == "dlq" else c[0],
)
def test_unreachable_redis_is_one_line(env: dict[str, str], command: list[str]) -> None:
    port = free_port()
    proc = cli({**env, "REDIS_URL": f"redis://ops:s3cret@127.0.0.1:{port}/0"}, *command)
    line = one_error_line(proc, code=4)  # unavailable, not a usage error: worth a retry
    assert line.startswith("error: redis: ")
    assert f"cannot reach Redis at redis://ops:***@127.0.0.1:{port}/0" in line
    assert "s3cret" not in proc.stderr
    assert ".;" not in line  # redis-py's sentence ends before ours goes on


# ---- fake-claude ----------------------------------------------------------------------------


def test_fake_claude_serves_until_signalled(env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "fake-claude", "--port", "0", "--rpm", "7",
         "--error-rate", "0.1", "--bad-key", "k1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("fake-claude listening on http://127.0.0.1:")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_fake_claude_bad_value_is_one_line(env: dict[str, str]) -> None:
    """Labelled `usage` like any bad value, naming the option (not the config's field)."""
    line = one_error_line(cli(env, "fake-claude", "--overloaded-rate", "2"))
    assert line.startswith("error: usage: --overloaded-rate must be in 0..1, got 2.0; "), line
    assert line.endswith(" fake-claude --help"), line
    line = one_error_line(cli(env, "fake-claude", "--overloaded-rate", "0.6",
                              "--error-rate", "0.6"))  # fmt: skip
    assert "error: usage: --overloaded-rate + --error-rate must be <= 1" in line, line
    line = one_error_line(cli(env, "fake-claude", "--latency-ms", "-5"))
    assert line.startswith("error: usage: --latency-ms must be"), line
