"""Every code block of README.md works as pasted.

Each block has one way of being checked, named in `HOW` by its section and its place there; a
block the table does not name fails the test, so a new snippet cannot go unchecked:

- `run`: the block runs (bash, Python, Node.js) and must exit 0 and print what it promises;
- `serve`: the block starts something that runs until stopped (the fake API and workers); it
  is started once, in the background, and the `run` blocks use it;
- `synopsis`: a list of commands to pick from; each `pipeline ...` line must parse with the
  real command's own parser (unknown commands and options fail), the rest are left alone;
- `config`: TOML that `load_settings` must accept;
- `module`: Python saved as `mymodule.py` for the block after it.

Redis is a private `redis-server` (the README uses the default prefix `pipeline`, which is
not ours to use on a shared server); `redis-cli` on PATH is a shim that connects to it, as a
user's would connect to their localhost. The only edit to a block is the fake API's port,
swapped for a free one. Node.js blocks need `node`: without it they are skipped, saying so;
ioredis is installed from npm (`tests/node/`) when `.ci/run` has not already done it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from pipeline.claude.config import load_settings
from pipeline.cli.main import app as cli_app
from pipeline.runtime.results import RESULT_FIELDS
from tests.helpers.redis_server import RedisServer, free_port, newest_redis_server

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "tests" / "node"
FAKE_PORT = "8787"

pytestmark = pytest.mark.skipif(
    newest_redis_server() is None, reason="needs redis-server (README tests use their own)"
)


@dataclass(frozen=True)
class Block:
    section: str
    n: int  # its place among the section's blocks, from 0
    lang: str
    code: str
    line: int

    @property
    def name(self) -> str:
        return f"{self.section} #{self.n} ({self.lang}, README.md:{self.line})"


def readme_blocks() -> list[Block]:
    found: list[Block] = []
    section, counts = "", dict[str, int]()
    lines = (ROOT / "README.md").read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("```") and line.strip() != "```":
            start, body = i + 1, []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            n = counts.get(section, 0)
            counts[section] = n + 1
            found.append(Block(section, n, line[3:].strip(), "\n".join(body) + "\n", start))
        i += 1
    return found


QUICK = "Quick start (two commands, on a fresh machine with Python 3.11+)"
SENDING = "Sending tasks (any language)"
WORKERS = "Running workers"
AGENTS = "Agents: tools, thinking, structured output"
HOW: dict[tuple[str, int], str] = {
    (QUICK, 0): "run",  # the demo, on its embedded default
    (QUICK, 1): "ci",  # the test command: .ci/run runs it verbatim
    (SENDING, 0): "run",  # redis-cli
    (SENDING, 1): "run",  # Node.js
    (SENDING, 2): "run",  # Python
    (SENDING, 3): "run",  # Python, submit_many with re-sends
    (AGENTS, 0): "run",  # redis-cli, a tool call
    ("The command line", 0): "synopsis",
    (WORKERS, 0): "synopsis",
    (WORKERS, 1): "serve",  # the fake API and workers for every `run` block
    (WORKERS, 2): "module",
    (WORKERS, 3): "run",  # the custom app, on a Redis of its own
    ("Configuration", 0): "config",
    ("Rate limits (shared by every worker)", 0): "config",
    ("Whole stack with Docker Compose, and Kubernetes", 0): "synopsis",
    ("Development", 0): "synopsis",
}
#: What each `run` block must print (beyond exiting 0).
PRINTS: dict[tuple[str, int], str] = {
    (QUICK, 0): r"completed 300  failed 0",
    (SENDING, 0): r"completed[\s\S]*^status\ncompleted$",  # HGETALL: any field order
    (SENDING, 1): r"^completed claude-",
    (SENDING, 2): r"'status': 'completed'",
    (SENDING, 3): r"^\['[0-9a-f]{32}', '[0-9a-f]{32}', '[0-9a-f]{32}'\]$",
    (WORKERS, 3): r"HELLO",
    (AGENTS, 0): r'(?s)(?=.*"stop_reason": "tool_use")(?=.*"type": "tool_use")',
}
BLOCKS = readme_blocks()


def by_place(section: str, n: int) -> Block:
    return next(b for b in BLOCKS if (b.section, b.n) == (section, n))


def test_every_block_is_checked_one_way() -> None:
    unnamed = [b.name for b in BLOCKS if (b.section, b.n) not in HOW]
    assert not unnamed, f"README blocks the README test does not check: {unnamed}"
    assert set(HOW) == {(b.section, b.n) for b in BLOCKS}, "HOW names a block that is gone"


def test_the_result_fields_listed_are_the_result_fields() -> None:
    text = " ".join((ROOT / "README.md").read_text().split())
    listed = text.split("The result hash `pipeline:result:<id>` has ", 1)[1].split(". ", 1)[0]
    names = re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", listed))  # not (`completed`)
    assert names == list(RESULT_FIELDS)


def test_the_test_command_is_the_one_ci_runs() -> None:
    command = by_place(QUICK, 1).code.strip().split(" && ")[-1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci, f"README's test command {command!r} is not a line of .ci/run"


def test_every_link_in_the_docs_stays_in_the_repo() -> None:
    """Relative links in the repository's Markdown name files of the repository (the docs
    once pointed at `../shared/DESIGN.md`, which a clone does not have)."""
    pages = [p for p in ROOT.rglob("*.md")
             if not {".git", "node_modules", ".venv"} & set(p.relative_to(ROOT).parts)]  # fmt: skip
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            found = (page.parent / target).resolve()
            if not found.exists() or not found.is_relative_to(ROOT):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert len(pages) > 5 and not broken, broken


# ---- the environment the blocks run in ----------------------------------------------------


@dataclass
class Stack:
    env: dict[str, str]
    shim: Path
    work: Path


def _env_for(url: str, shim: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "PIPELINE_"))}
    env.update(
        REDIS_URL=url,
        PATH=f"{shim}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
        NODE_PATH=str(NODE_DIR / "node_modules"),
    )
    return env


def _redis_cli_shim(shim: Path) -> None:
    real = shutil.which("redis-cli")
    if real is None:
        pytest.skip("needs redis-cli")
    shim.mkdir(parents=True, exist_ok=True)
    script = shim / "redis-cli"
    script.write_text(f'#!/bin/sh\nexec {real} -u "$REDIS_URL" "$@"\n')
    script.chmod(0o755)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A private Redis, and the README's own block that starts the fake API and workers."""
    work = tmp_path_factory.mktemp("readme")
    server = RedisServer(work / "redis").start()
    shim = work / "bin"
    _redis_cli_shim(shim)
    env = _env_for(server.url, shim)
    serve = by_place(WORKERS, 1).code.replace(FAKE_PORT, str(free_port()))
    log = open(work / "serve.log", "wb")  # noqa: SIM115 (open until the module ends)
    proc = subprocess.Popen(["bash", "-c", serve], cwd=work, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        yield Stack(env, shim, work)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        server.stop()


def _node_ready() -> None:
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed here: the Node.js block is not run")
    if not (NODE_DIR / "node_modules" / "ioredis").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"],
                       cwd=NODE_DIR, check=True, timeout=300)  # fmt: skip


def _run(block: Block, env: dict[str, str], cwd: Path, timeout: float = 120) -> str:
    if block.lang == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", block.code]
    elif block.lang == "python":
        cmd = [sys.executable, "-c", block.code]
    elif block.lang == "js":
        _node_ready()
        cmd = ["node", "-e", block.code]
    else:
        raise AssertionError(f"{block.name}: no way to run {block.lang!r}")
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{block.name} exited {proc.returncode}:\n{out}"
    print(f"{block.name}: ok in {time.monotonic() - started:.1f}s\n{out}")
    return proc.stdout


RUN = [b for b in BLOCKS if HOW.get((b.section, b.n)) == "run"]


@pytest.mark.parametrize("block", RUN, ids=[b.name for b in RUN])
def test_a_run_block_runs_as_pasted(block: Block, stack: Stack, tmp_path: Path) -> None:
    place = (block.section, block.n)
    if place == (QUICK, 0):  # the install is what this checkout already did
        command = block.code.strip().split(" && ")[-1]
        assert command == "pipeline demo", block.code
        block = Block(block.section, block.n, "bash", command + "\n", block.line)
        out = _run(block, stack.env, tmp_path, timeout=300)
    elif place == (WORKERS, 3):  # its own Redis: the custom app must be alone on the prefix
        (tmp_path / "mymodule.py").write_text(by_place(WORKERS, 2).code)
        server = RedisServer(tmp_path / "redis").start()
        try:
            out = _run(block, _env_for(server.url, stack.shim), tmp_path)
        finally:
            server.stop()
    else:
        out = _run(block, stack.env, tmp_path)
    assert re.search(PRINTS[place], out.strip(), re.MULTILINE), out


def _parse_error(words: list[str]) -> str | None:
    """What the real `pipeline` parser says of `pipeline <words>` (None: it parses). With
    `--help` last, the command runs nothing, but unknown commands and options still fail."""
    result = CliRunner().invoke(cli_app, [*words, "--help"])
    return None if result.exit_code == 0 else result.output.strip()


SYNOPSES = [b for b in BLOCKS if HOW.get((b.section, b.n)) == "synopsis"]


@pytest.mark.parametrize("block", SYNOPSES, ids=[b.name for b in SYNOPSES])
def test_each_command_of_a_synopsis_parses(block: Block) -> None:
    checked = 0
    for line in block.code.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] != ["pipeline"]:
            continue
        error = _parse_error(words[1:])
        assert error is None, f"{block.name}: {line.strip()!r}: {error}"
        checked += 1
    docker_or_dev = block.section.startswith(("Whole stack", "Development"))
    assert checked or docker_or_dev, f"{block.name}: no pipeline command in it"


CONFIGS = [b for b in BLOCKS if HOW.get((b.section, b.n)) == "config"]


@pytest.mark.parametrize("block", CONFIGS, ids=[b.name for b in CONFIGS])
def test_a_config_block_is_accepted(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text(block.code)
    load_settings(path, env={})


def test_the_custom_stage_module_defines_an_app(tmp_path: Path) -> None:
    namespace: dict[str, object] = {}
    exec(compile(by_place(WORKERS, 2).code, "mymodule.py", "exec"), namespace)
    from pipeline import App

    assert isinstance(namespace["app"], App)


def test_every_run_block_says_what_it_prints() -> None:
    assert set(PRINTS) == {(b.section, b.n) for b in RUN}


def test_the_harness_reports_what_fails(stack: Stack, tmp_path: Path) -> None:
    """A block that fails, and a command line the CLI would refuse, are reported."""
    bad = Block("test", 0, "bash", "redis-cli PING\nfalse\n", 0)
    with pytest.raises(AssertionError, match="exited 1"):
        _run(bad, stack.env, tmp_path)
    assert _parse_error(["worker", "--no-such-option"]) is not None
    assert _parse_error(["no-such-command"]) is not None
    with redis.Redis.from_url(stack.env["REDIS_URL"]) as client:
        assert client.ping()
