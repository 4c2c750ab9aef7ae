"""`pipeline demo`: the whole pipeline on one machine, for a first look.

Redis at REDIS_URL if reachable, else a private redis-server; the fake Claude API unless
ANTHROPIC_API_KEY is set; worker processes running all four stages; a sample workload with
duplicates and mixed task types; a summary; and everything stopped again. A worker process
that dies stops the demo at once, with its last log lines. Its keys live under
a fresh prefix that is deleted at the end (unless --keep), so it never touches other data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from redis.asyncio import Redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from pipeline.claude.settings import Settings
from pipeline.cli.exits import Code, fail
from pipeline.client import Client
from pipeline.runtime.embedded_redis import RedisServer, free_port
from pipeline.runtime.keys import Keys
from pipeline.runtime.redis_conn import open_redis, redacted
from pipeline.runtime.settings import RedisSettings

TOPICS = [
    "the water cycle", "a failed database migration", "quarterly sales in Europe",
    "a customer who was double charged", "the history of the printing press",
    "a bug report about login timeouts", "solar panel efficiency", "a delayed shipment",
    "the rules of chess", "an outage post-mortem", "a new hire's first week",
    "the benefits of code review", "a refund request", "rain forecasts for Lisbon",
]  # fmt: skip
KINDS = [  # (task type, model, template, share of the workload)
    ("classify", "auto", "Classify the sentiment of a message about {t}.", 0.30),
    ("extract", "auto", "Extract every date, name and amount in a note about {t}.", 0.20),
    ("summarise", "auto", "Summarise in two sentences: a long report on {t}.", 0.20),
    ("analyse", "auto", "Think step by step and analyse {t} carefully, with risks.", 0.25),
    ("review", "opus", "Review this design for {t}; list its three weakest points.", 0.05),
]


@dataclass
class DemoReport:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cached: int = 0
    latencies_ms: list[int] = field(default_factory=list)
    by_model: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    errors: Counter[str] = field(default_factory=Counter)
    dead_worker: str | None = None  # a worker process that exited while tasks were running


def workload(
    n: int, duplicate_share: float, seed: int, deferrable_share: float = 0.0
) -> list[dict[str, str]]:
    """n tasks of mixed types; about `duplicate_share` of them repeat an earlier request, and
    about `deferrable_share` of the others may wait for the batch lane (`batch=true`)."""
    rng = random.Random(seed)
    tasks: list[dict[str, str]] = []
    weights = [k[3] for k in KINDS]
    for _ in range(n):
        if tasks and rng.random() < duplicate_share:
            tasks.append(dict(rng.choice(tasks)))
            continue
        kind, model, template, _share = rng.choices(KINDS, weights)[0]
        topic = f"{rng.choice(TOPICS)} (case {rng.randint(1, 10_000)})"
        task = {"prompt": template.format(t=topic), "type": kind, "model": model,
                "max_tokens": "400"}  # fmt: skip
        if deferrable_share and rng.random() < deferrable_share:
            task["batch"] = "true"
        tasks.append(task)
    return tasks


async def _reachable(url: str) -> bool:
    """Whether the node `url` names answers (a PING: any node of a Cluster answers it)."""
    client = Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


@contextlib.contextmanager
def _fake_claude(console: Console, logdir: Path) -> Iterator[dict[str, str]]:
    """Env for the workers: the real API if ANTHROPIC_API_KEY is set, else a local fake."""
    if os.environ.get("ANTHROPIC_API_KEY"):
        console.print("Claude: [bold]the real Anthropic API[/] (ANTHROPIC_API_KEY is set)")
        yield {}
        return
    # Its own process, so that the demo's waiters and progress bars do not slow it down.
    port = free_port()
    cmd = [sys.executable, "-m", "pipeline.fake_claude", "--port", str(port),
           "--latency-ms", "600", "--latency-sigma", "0.5", "--latency-cap-ms", "5000",
           "--overloaded-rate", "0.03", "--rpm", "20000", "--seed", "7"]  # fmt: skip
    log = logdir / "fake-claude.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out)
    base_url = f"http://127.0.0.1:{port}"
    try:
        if not _wait_for_port(port, proc):
            why = "exited" if proc.poll() is not None else "did not listen within 15 s"
            _show_tail(console, f"the fake Claude API {why}", log)
            raise fail(f"the fake Claude API {why}", Code.FAILED, label="demo",
                       hint=f"its log: {log}")  # fmt: skip
        console.print(f"Claude: the built-in fake API at {base_url} "
                      "(latency ~0.6 s, 3% overloaded errors, 20,000 requests/min)")  # fmt: skip
        yield {"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "demo-key"}
    finally:
        proc.terminate()
        proc.wait(10)


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 15) -> bool:
    """Whether `proc` listens on `port` within `timeout_s` (False at once if it exits)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def _start_workers(n: int, env: dict[str, str], logdir: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(n):
        with (logdir / f"worker-{i}.log").open("wb") as log:  # the child keeps its own handle
            cmd = [sys.executable, "-m", "pipeline.cli", "worker", "--all"]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


async def _first_death(procs: list[subprocess.Popen[bytes]], every_s: float = 0.1) -> int:
    """The index of the first worker process to exit (they run until the demo stops them)."""
    while True:
        for i, proc in enumerate(procs):
            if proc.poll() is not None:
                return i
        await asyncio.sleep(every_s)


async def _drive_watching(drive: Coroutine[Any, Any, None],
                          procs: list[subprocess.Popen[bytes]]) -> int | None:  # fmt: skip
    """Run `drive` while watching the workers: None when it finished, else (at once, not
    after the results' timeouts) the index of the worker that died; `drive` is stopped."""
    driving = asyncio.ensure_future(drive)
    watching = asyncio.ensure_future(_first_death(procs))
    try:
        await asyncio.wait({driving, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (driving, watching):
            if not task.done():
                task.cancel()
        await asyncio.gather(driving, watching, return_exceptions=True)
    if driving.done() and not driving.cancelled():
        driving.result()  # its exception, if it failed
        return None
    return watching.result()


def _show_tail(console: Console, what: str, log: Path, lines: int = 15) -> None:
    """`what`, then the last lines of `log`, indented (shown as written, never as markup)."""
    try:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        tail = []
    console.print(Text(f"{what}; the last lines of {log}:", style="bold red"))
    for text in tail or ["(empty)"]:
        console.print(Text(f"  | {text}"), soft_wrap=True)


def _stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


async def run_demo(settings: Settings, *, tasks: int = 300, workers: int = 2,
                   keep: bool = False, console: Console | None = None) -> DemoReport:  # fmt: skip
    console = console or Console()
    server: RedisServer | None = None
    url = settings.redis.url
    if await _reachable(url):
        console.print(f"Redis: {redacted(url)}")
    else:
        server = RedisServer(Path(tempfile.mkdtemp(prefix="pipeline-demo-redis-"))).start()
        url = server.url
        console.print(f"Redis: none reachable, started a private redis-server at {url}")
    prefix = f"demo-{uuid.uuid4().hex[:8]}"
    logdir = Path(tempfile.mkdtemp(prefix="pipeline-demo-logs-"))
    report = DemoReport()
    try:
        with _fake_claude(console, logdir) as claude_env:
            env = {**os.environ, **claude_env, "REDIS_URL": url, "PIPELINE_PREFIX": prefix,
                   "PIPELINE_RUNTIME__GRACE_S": "5"}  # fmt: skip
            procs = _start_workers(workers, env, logdir)
            try:
                drive = _drive(settings, url, prefix, tasks, report, console)
                dead = await _drive_watching(drive, procs)
            finally:
                _stop_workers(procs)
            if dead is not None:
                code = procs[dead].returncode
                report.dead_worker = f"worker {dead} (pid {procs[dead].pid}) exited with {code}"
                _show_tail(console, report.dead_worker, logdir / f"worker-{dead}.log")
            elif report.completed + report.failed < report.submitted:
                console.print(f"[red]some tasks did not finish; worker logs in {logdir}[/]")
    finally:
        if not keep:
            await _delete_prefix(url, prefix)
        if server is not None:
            server.stop()
    if report.dead_worker:
        console.print(Text(f"demo stopped: {report.dead_worker}", style="bold red"))
    else:
        _summary(report, console, prefix if keep else None)
    return report


async def _drive(settings: Settings, url: str, prefix: str, n: int, report: DemoReport,
                 console: Console) -> None:  # fmt: skip
    demo_settings = msgspec.structs.replace(
        settings, prefix=prefix, redis=msgspec.structs.replace(settings.redis, url=url)
    )
    fresh = workload(n - n // 4, duplicate_share=0.0, seed=11)
    # A quarter of the workload repeats earlier requests after they were answered: the
    # response cache serves those (complete answers only) without calling Claude.
    repeats = random.Random(12).sample(fresh, k=n // 4) if n // 4 <= len(fresh) else []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    async with Client.from_settings(demo_settings) as client:
        with Progress(*columns, console=console) as progress:
            for label, batch in (("new tasks", fresh), ("repeated tasks", repeats)):
                if batch:
                    await _run_wave(client, progress, label, batch, report)


async def _run_wave(client: Client, progress: Progress, label: str,
                    batch: list[dict[str, str]], report: DemoReport) -> None:  # fmt: skip
    sub = progress.add_task(f"submitting {label}", total=len(batch))
    ids: list[str] = []
    for i in range(0, len(batch), 50):
        ids += await client.submit_many(batch[i : i + 50])
        progress.advance(sub, len(batch[i : i + 50]))
    report.submitted += len(ids)
    done = progress.add_task(f"completing {label}", total=len(ids))

    async def one(task_id: str) -> None:
        _count(report, await client.result(task_id, wait=120))
        progress.advance(done)

    await asyncio.gather(*(one(t) for t in ids))


def _count(report: DemoReport, result: dict[str, str] | None) -> None:
    if result is None:
        return
    if result.get("status") != "completed":
        report.failed += 1
        report.errors[result.get("error", "")[:80]] += 1
        return
    report.completed += 1
    cached = result.get("cached") == "true"
    report.cached += cached
    row = report.by_model[result.get("model", "?")]
    row["tasks"] += 1
    row["cached"] += cached
    for name in ("input_tokens", "output_tokens"):
        row[name] += int(result.get(name) or 0)
    row["cost_micro_usd"] += round(float(result.get("cost_usd") or 0) * 1_000_000)
    report.latencies_ms.append(int(result.get("latency_ms") or 0))


def _percentile(values: list[int], q: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(report: DemoReport, console: Console, kept_prefix: str | None) -> None:
    table = Table(title="pipeline demo: results by model")
    table.add_column("model", no_wrap=True)
    for col in ("tasks", "from cache", "input tokens", "output tokens", "cost (USD)"):
        table.add_column(col, justify="right")
    for model, row in sorted(report.by_model.items()):
        table.add_row(model, f"{row['tasks']:,}", f"{row['cached']:,}",
                      f"{row['input_tokens']:,}", f"{row['output_tokens']:,}",
                      f"{row['cost_micro_usd'] / 1e6:.4f}")  # fmt: skip
    console.print(table)
    p50, p99 = _percentile(report.latencies_ms, 0.5), _percentile(report.latencies_ms, 0.99)
    console.print(
        f"submitted {report.submitted:,}  completed {report.completed:,}  "
        f"failed {report.failed:,}  from cache {report.cached:,}  "
        f"latency p50 {p50:,} ms  p99 {p99:,} ms"
    )
    for error, count in report.errors.most_common(5):
        console.print(f"  [red]{count} failed:[/] {error}")
    if kept_prefix:
        console.print(f"keys kept under prefix {kept_prefix!r} (PIPELINE_PREFIX={kept_prefix})")


async def _delete_prefix(url: str, prefix: str) -> None:
    """Best effort: the demo's keys also expire by TTL where they have one. On a Cluster,
    every primary is scanned and the keys are unlinked slot by slot."""
    try:
        client = await open_redis(RedisSettings(url=url))
    except Exception:
        return
    try:
        batch = [key async for key in client.scan_iter(match=Keys(prefix).pattern(), count=1000)]
        for i in range(0, len(batch), 500):
            await client.unlink(*batch[i : i + 500])
    except Exception:
        pass
    finally:
        await client.aclose()
