"""Sustained load: a steady task rate through all four stages for minutes, open loop.

    python benchmarks/sustained.py --rate 116 --duration 300

The issue's target: 10M tasks/day (116 tasks/s) for 5 minutes on this 2-core machine, with
lognormal Claude latency (median 5 s), all four stages (cache-check -> router -> claude-call
-> store): pipeline overhead (time outside the Claude call) p99 < 50 ms and no backlog growth.

Runs a private redis-server (or --redis-url, under a fresh key prefix deleted at the end),
the fake Claude API in its own process (no rate limits, no injected errors unless asked),
`--workers` processes of `python -m pipeline.cli worker --all`, and a paced producer in this
process: an asyncio loop that XADDs, every --tick-ms (10 ms), what the schedule says is due,
in one pipelined round trip, never slowing down when the pipeline lags (open loop). Every
task is distinct (unique prompt), so every task calls the fake; the mix of task types is
routed by `model=auto` to the haiku / sonnet / opus lanes (about 70 / 25 / 5 %) unless
--model names one family. --call-concurrency sets claude-call's slots per lane per worker.

Every --sample-every seconds it prints one line: tasks sent and finished, entries waiting
(XLEN - pending) per stage stream, entries in flight (pending) per stage, delayed retries,
and the CPU % of each process over the interval. The steady window runs from --warmup to the
end of production; at the end it reads every task's result hash and prints:

  - pipeline overhead per task = `latency_ms` - `call_ms` (XADD -> store, minus the Claude
    call's own duration), p50 / p90 / p99 / max, for tasks submitted in the steady window
    (and for all tasks);
  - end-to-end latency p50 / p99, achieved throughput, completed / failed counts;
  - the waiting backlog at the start and end of the steady window; "no growth" means the
    end value is at most --backlog-bound-s seconds' worth of tasks (default 2 s);
  - each worker's CPU % and peak RSS, the fake's and Redis's CPU, the load average.

The last line is `overhead_p99_ms=<n>`; the exit status is 0 whenever the run measured (the
target met or not), 1 on a setup error or a process that died. If the result hashes carry no
`call_ms`, the overhead cannot be computed: it says so and exits with status 2 (after the
other figures).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.claude.config import load_settings  # noqa: E402
from pipeline.runtime.embedded_redis import RedisServer, free_port  # noqa: E402
from pipeline.runtime.keys import Keys  # noqa: E402

RESULT_FIELDS = ("status", "latency_ms", "call_ms", "cached", "attempts", "error", "model")
TOPICS = (
    "the water cycle", "a failed database migration", "quarterly sales in Europe",
    "a customer who was double charged", "the history of the printing press",
    "a bug report about login timeouts", "solar panel efficiency", "a delayed shipment",
    "the rules of chess", "an outage post-mortem", "a new hire's first week",
)  # fmt: skip
# (task type, template, share); with model=auto the router sends the first three to haiku,
# `analyse` to the default family (sonnet); `review` asks for opus explicitly.
KINDS = (
    ("classify", "auto", "Classify the sentiment of a message about {t}.", 0.30),
    ("extract", "auto", "Extract every date, name and amount in a note about {t}.", 0.20),
    ("summarise", "auto", "Summarise in two sentences: a long report on {t}.", 0.20),
    ("analyse", "auto", "Think step by step and analyse {t} carefully, with risks.", 0.25),
    ("review", "opus", "Review this design for {t}; list its three weakest points.", 0.05),
)


class BenchError(Exception):
    """A failure the benchmark explains in one message (no traceback needed)."""


# ---- processes -------------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (NaN once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text) or "    (empty log)"


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the fake Claude API exited at start:\n{log_tail(log)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"the fake Claude API did not listen on {port} within {timeout_s:.0f} s")


def start_fake(args: argparse.Namespace, logdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "pipeline.fake_claude", "--port", str(port),
           "--latency-ms", str(args.latency_ms), "--latency-sigma", str(args.sigma),
           "--latency-cap-ms", str(args.latency_cap_ms), "--seed", str(args.seed),
           "--overloaded-rate", str(args.overloaded_rate),
           "--server-error-rate", str(args.server_error_rate)]  # fmt: skip
    if args.rpm:
        cmd += ["--rpm", str(args.rpm)]
    log = logdir / "fake-claude.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    wait_for_port(port, proc, log, timeout_s=20)
    return proc, f"http://127.0.0.1:{port}"


def start_workers(n: int, env: dict[str, str], logdir: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(n):
        with open(logdir / f"worker-{i}.log", "wb") as out:
            cmd = [sys.executable, "-m", "pipeline.cli", "worker", "--all"]
            procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            )
    return procs


def stop(procs: list[subprocess.Popen[bytes]], wait_s: float) -> None:
    """SIGTERM, wait (bounded), then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def fake_stats(base_url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{base_url}/_fake/stats", timeout=10) as reply:
            data: dict[str, Any] = json.loads(reply.read())
    except (OSError, ValueError):
        return None
    return data


# ---- measuring -------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the producer started
    sent: int
    finished: int  # done events (completed + failed)
    dlq: int
    queued: dict[str, int]  # stream label -> entries not yet read by any worker
    inflight: dict[str, int]  # stream label -> entries read, not yet handed on (pending)
    delayed: int
    cpu: dict[str, float]  # process label -> CPU seconds so far
    redis_cpu: float
    wall: float  # time.monotonic()

    @property
    def queued_total(self) -> int:
        return sum(self.queued.values())


@dataclass
class Run:
    t0: float = 0.0  # monotonic time the producer started
    t0_wall: float = 0.0  # the same instant, time.time()
    ids: list[str] = field(default_factory=list)
    sent: int = 0
    produce_s: float = 0.0
    tick_late_ms: list[float] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    window: tuple[Sample, Sample] | None = None
    drained: bool = False
    drain_s: float = 0.0


class Probe:
    """Reads the pipeline's state in a few pipelined round trips."""

    def __init__(self, r: Redis, keys: Keys, lanes: list[str],
                 pids: dict[str, int]) -> None:  # fmt: skip
        self.r, self.keys, self.pids = r, keys, pids
        self.streams = {"tasks": keys.ingress, "route": keys.stream("route")}
        self.streams |= {lane: keys.stream("call", lane) for lane in lanes}
        self.streams["store"] = keys.stream("store")

    async def sample(self, t: float, sent: int) -> Sample:
        pipe = self.r.pipeline(transaction=False)
        for stream in self.streams.values():
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
            pipe.zcard(self.keys.delayed(stream))
        pipe.xlen(self.keys.done)
        pipe.xlen(self.keys.dlq)
        pipe.info("cpu")
        replies = await pipe.execute(raise_on_error=False)
        queued, inflight, delayed = {}, {}, 0
        for i, label in enumerate(self.streams):
            length, groups, waiting = replies[3 * i : 3 * i + 3]
            length = length if isinstance(length, int) else 0
            pending = sum(g["pending"] for g in groups) if isinstance(groups, list) else 0
            inflight[label] = pending
            queued[label] = max(0, length - pending)
            delayed += waiting if isinstance(waiting, int) else 0
        done, dlq, info = replies[-3:]
        cpu = {name: cpu_s(pid) for name, pid in self.pids.items()}
        return Sample(
            t=t, sent=sent, finished=int(done), dlq=int(dlq), queued=queued,
            inflight=inflight, delayed=delayed, cpu=cpu,
            redis_cpu=float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
            wall=time.monotonic(),
        )  # fmt: skip


def workload(n_start: int, n: int, rng: random.Random, tag: str,
             model: str) -> list[dict[str, str]]:  # fmt: skip
    """n distinct tasks (the tag and the task number make every prompt unique)."""
    weights = [k[3] for k in KINDS]
    out = []
    for i in range(n_start, n_start + n):
        kind, kind_model, template, _ = rng.choices(KINDS, weights)[0]
        prompt = template.format(t=rng.choice(TOPICS)) + f" (run {tag}, task {i})"
        out.append({"prompt": prompt, "type": kind, "max_tokens": "400",
                    "model": kind_model if model == "mixed" else model})  # fmt: skip
    return out


async def produce(r: Redis, keys: Keys, args: argparse.Namespace, run: Run, tag: str) -> None:
    """Open loop: each tick XADDs whatever the schedule says is due by now, in one round trip;
    a late tick (the loop or Redis was slow) sends more, it never lowers the rate."""
    loop = asyncio.get_running_loop()
    rng = random.Random(args.seed)
    total = round(args.rate * args.duration)
    tick, tick_s = 0, args.tick_ms / 1000
    while run.sent < total:
        now = loop.time()
        elapsed = now - run.t0
        due = total if elapsed >= args.duration else min(total, int(args.rate * elapsed))
        if due > run.sent:
            tasks = workload(run.sent, due - run.sent, rng, tag, args.model)
            pipe = r.pipeline(transaction=False)
            for task in tasks:
                pipe.xadd(keys.ingress, task)  # type: ignore[arg-type]
            ids = await pipe.execute()
            run.ids += [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
            run.sent = due
        tick += 1
        next_at = run.t0 + tick * tick_s
        if loop.time() < next_at:
            await asyncio.sleep(next_at - loop.time())
        late_s = loop.time() - next_at
        run.tick_late_ms.append(max(0.0, late_s) * 1000)
        if late_s > tick_s:  # overran a whole tick: the next send catches up, then re-align
            tick = int((loop.time() - run.t0) / tick_s)
    run.produce_s = loop.time() - run.t0


def sample_line(s: Sample, prev: Sample | None, lanes: list[str]) -> str:
    q, f = s.queued, s.inflight
    call_q = "/".join(str(q[lane]) for lane in lanes)
    call_f = "/".join(str(f[lane]) for lane in lanes)
    other_f = sum(v for k, v in f.items() if k not in lanes)
    cpu = ""
    if prev is not None and s.wall > prev.wall:
        dt = s.wall - prev.wall
        parts = [f"{name} {100 * (s.cpu[name] - prev.cpu[name]) / dt:.0f}" for name in s.cpu]
        parts.append(f"redis {100 * (s.redis_cpu - prev.redis_cpu) / dt:.0f}")
        cpu = " | cpu% " + " ".join(parts)
    return (
        f"t={s.t:5.0f}s sent {s.sent:7,} done {s.finished:7,} dlq {s.dlq:4} | waiting "
        f"tasks {q['tasks']} route {q['route']} call {call_q} store {q['store']} | in flight "
        f"call {call_f} other {other_f} | delayed {s.delayed}{cpu}"
    )


async def drive(url: str, keys: Keys, lanes: list[str], args: argparse.Namespace,
                pids: dict[str, int], procs: dict[str, subprocess.Popen[bytes]],
                logdir: Path, tag: str) -> Run:  # fmt: skip
    run = Run()
    producer_r = Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
    probe_r = Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
    probe = Probe(probe_r, keys, lanes, pids)
    loop = asyncio.get_running_loop()
    try:
        await wait_ready(probe_r, keys, probe, args.workers, procs, logdir)
        print(
            f"{'':>9}waiting = unread entries per stream (call lanes "
            f"{'/'.join(lanes)}); in flight = read, not yet handed on",
            flush=True,
        )
        run.t0, run.t0_wall = loop.time(), time.time()
        producer = asyncio.create_task(produce(producer_r, keys, args, run, tag))
        warmup = min(args.warmup, args.duration / 3)
        marks = sorted({*range(0, int(args.duration) + 1, args.sample_every), warmup,
                        args.duration})  # fmt: skip
        total = round(args.rate * args.duration)
        prev: Sample | None = None
        window_start: Sample | None = None
        t_next = iter([*marks, *(args.duration + k * args.sample_every for k in range(1, 10**6))])
        drain_deadline: float | None = None
        while True:
            mark = next(t_next)
            # Half a tick off the producer's ticks, so a sample does not count the entries
            # XADDed in the same instant as waiting.
            await asyncio.sleep(max(0.0, run.t0 + mark + args.tick_ms / 2000 - loop.time()))
            if producer.done() and producer.exception() is not None:
                raise BenchError(f"the producer failed: {producer.exception()!r}")
            check_alive(procs, logdir)
            s = await probe.sample(loop.time() - run.t0, run.sent)
            run.samples.append(s)
            print(sample_line(s, prev, lanes), flush=True)
            prev = s
            if mark == warmup:
                window_start = s
            if mark == args.duration:
                await producer
                assert window_start is not None
                run.window = (window_start, s)
                drain_deadline = loop.time() + args.drain_timeout
                print(f"production done: {run.sent:,} tasks in {run.produce_s:.1f} s; "
                      f"draining (at most {args.drain_timeout:.0f} s)", flush=True)  # fmt: skip
            if drain_deadline is not None:
                if s.finished >= total:
                    run.drained = True
                    break
                if loop.time() >= drain_deadline:
                    break
        run.drain_s = loop.time() - run.t0 - args.duration
        if not run.drained:  # one last look, without waiting for the next sample
            s = await probe.sample(loop.time() - run.t0, run.sent)
            run.samples.append(s)
            run.drained = s.finished >= total
    finally:
        await producer_r.aclose()
        await probe_r.aclose()
    return run


async def wait_ready(r: Redis, keys: Keys, probe: Probe, workers: int,
                     procs: dict[str, subprocess.Popen[bytes]], logdir: Path,
                     timeout_s: float = 90) -> None:  # fmt: skip
    """Until every worker holds its consumer name and every stage's group exists."""
    deadline = time.monotonic() + timeout_s
    while True:
        check_alive(procs, logdir)
        names = [k async for k in r.scan_iter(match=keys.worker("*"), count=1000)]
        pipe = r.pipeline(transaction=False)
        for stream in probe.streams.values():
            pipe.xinfo_groups(stream)
        groups = await pipe.execute(raise_on_error=False)
        if len(names) >= workers and all(isinstance(g, list) and g for g in groups):
            await asyncio.sleep(1.0)  # the last groups' readers are blocking now
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"workers not ready after {timeout_s:.0f} s ({len(names)}/{workers} consumer "
                f"names held); logs in {logdir}"
            )
        await asyncio.sleep(0.2)


def check_alive(procs: dict[str, subprocess.Popen[bytes]], logdir: Path) -> None:
    for name, p in procs.items():
        if p.poll() is not None:
            log = logdir / ("fake-claude.log" if name == "fake" else f"worker-{name[1:]}.log")
            raise BenchError(f"{name} exited early (status {p.returncode}):\n{log_tail(log)}")


async def read_results(url: str, keys: Keys, ids: list[str]) -> list[list[str | None]]:
    r = Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, decode_responses=True)
    out: list[list[str | None]] = []
    try:
        for i in range(0, len(ids), 1000):
            pipe = r.pipeline(transaction=False)
            for task_id in ids[i : i + 1000]:
                pipe.hmget(keys.result(task_id), list(RESULT_FIELDS))
            out += await pipe.execute()
    finally:
        await r.aclose()
    return out


# ---- report ----------------------------------------------------------------------------------


def pct(values: list[int], q: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def report(args: argparse.Namespace, run: Run, results: list[list[str | None]],
           cpu_window: dict[str, float], rss: dict[str, float], redis_window_cpu: float,
           fake: dict[str, Any] | None, load_before: tuple[float, ...],
           self_cpu_s: float) -> int:  # fmt: skip
    """Print the summary; the exit status (2 when results carry no call_ms)."""
    assert run.window is not None
    w0, w1 = run.window
    window_s = w1.wall - w0.wall
    steady_from_ms = int((run.t0_wall + w0.t) * 1000)  # XADD time = the entry id's ms
    status: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latency_all, latency_steady = [], []
    overhead_all, overhead_steady, overhead_first_try = [], [], []
    missing_call_ms = zero_call_ms = retried = cached = 0
    for task_id, row in zip(run.ids, results, strict=True):
        values = dict(zip(RESULT_FIELDS, row, strict=True))
        st = values["status"] or "missing"
        status[st] += 1
        if st != "completed":
            if st == "failed":
                errors[(values["error"] or "")[:90]] += 1
            continue
        steady = entry_ms(task_id) >= steady_from_ms
        latency = int(values["latency_ms"] or 0)
        latency_all.append(latency)
        if steady:
            latency_steady.append(latency)
        cached += values["cached"] == "true"
        attempts = int(values["attempts"] or 0)
        retried += attempts > 1
        if not values["call_ms"]:
            missing_call_ms += 1
            continue
        zero_call_ms += values["call_ms"] == "0" and values["cached"] != "true"
        overhead = latency - int(values["call_ms"] or 0)
        overhead_all.append(overhead)
        if steady:
            overhead_steady.append(overhead)
            if attempts <= 1:
                overhead_first_try.append(overhead)

    total = round(args.rate * args.duration)
    print()
    print(f"sustained: {args.rate:g} tasks/s for {args.duration:g} s, {args.workers} worker "
          f"processes (--all), fake latency lognormal median {args.latency_ms:g} ms "
          f"sigma {args.sigma:g}, model mix {args.model}, cache "
          f"{'on' if args.cache else 'off'}")  # fmt: skip
    late = sorted(run.tick_late_ms)
    print(f"  producer: {run.sent:,}/{total:,} tasks sent in {run.produce_s:.1f} s "
          f"({run.sent / max(run.produce_s, 1e-9):.1f}/s); ticks late p99 "
          f"{pct(late, 0.99):.0f} ms (int), max {max(late, default=0):.0f} ms")  # fmt: skip
    finished_window = w1.finished - w0.finished
    print(f"  steady window {w0.t:.0f}-{w1.t:.0f} s: {finished_window / window_s:.1f} tasks/s "
          f"finished (offered {args.rate:g}/s)")  # fmt: skip
    print(f"  finished: completed {status['completed']:,}  failed {status['failed']:,}  "
          f"no result {status['missing']:,}  (cache hits {cached}, retried {retried}); "
          f"{'drained' if run.drained else 'NOT drained'} "
          f"{run.drain_s:.1f} s after production")  # fmt: skip
    for error, n in errors.most_common(3):
        print(f"    {n} failed: {error}")
    bound = args.backlog_bound_s * args.rate
    grew = w1.queued_total > bound
    print(f"  waiting backlog (unread entries, all stages): {w0.queued_total} at "
          f"{w0.t:.0f} s -> {w1.queued_total} at {w1.t:.0f} s; bound "
          f"{bound:.0f} ({args.backlog_bound_s:g} s of tasks): "
          f"{'GROWING' if grew else 'no growth'}")  # fmt: skip
    steady_samples = [s for s in run.samples if w0.t <= s.t <= w1.t]
    slope = trend([(s.t, s.queued_total) for s in steady_samples])
    if not grew and slope * window_s > bound:
        print(f"    but rising: the trend adds {slope * window_s:.0f} entries over the window")
    peak = max(steady_samples, key=lambda s: s.queued_total)
    where = ", ".join(f"{k} {v}" for k, v in peak.queued.items() if v)
    print(f"    trend {slope:+.2f} entries/s; peak {peak.queued_total} at {peak.t:.0f} s"
          + (f" ({where})" if where else ""))  # fmt: skip
    infl0, infl1 = sum(w0.inflight.values()), sum(w1.inflight.values())
    print(f"  in flight (read, not handed on): {infl0} -> {infl1}; "
          f"delayed retries {w0.delayed} -> {w1.delayed}")  # fmt: skip
    print(
        f"  end-to-end latency (XADD -> store), steady window: p50 "
        f"{pct(latency_steady, 0.5):,} ms  p99 {pct(latency_steady, 0.99):,} ms  "
        f"(all tasks p50 {pct(latency_all, 0.5):,} p99 {pct(latency_all, 0.99):,})"
    )
    print(f"  CPU over the steady window ({window_s:.0f} s), % of one core; peak RSS:")
    for name, seconds in cpu_window.items():
        mem = f", peak RSS {rss[name]:.0f} MB" if name in rss else ""
        print(f"    {name:>8}: {100 * seconds / window_s:5.1f} %{mem}")
    print(f"    {'redis':>8}: {100 * redis_window_cpu / window_s:5.1f} % (INFO cpu)")
    print(f"    this script (producer + sampler), whole run: {self_cpu_s:.1f} CPU s")
    print(f"  load average: before {fmt_load(load_before)}, after {fmt_load(os.getloadavg())} "
          f"({os.cpu_count()} CPUs)")  # fmt: skip
    if fake is not None:
        print(
            f"  fake API: {fake.get('requests_total', 0):,} requests, by status "
            f"{fake.get('by_status')}, most in flight {fake.get('inflight_max')}, "
            f"requests answered more than once: {fake.get('duplicate_requests')}"
        )
    completed = status["completed"]
    fresh = completed - cached
    if missing_call_ms or (fresh and zero_call_ms == fresh):
        what = (f"{missing_call_ms:,} of {completed:,} completed results have no `call_ms` field"
                if missing_call_ms else
                f"every fresh (not cached) answer has call_ms 0 ({fresh:,} results)")  # fmt: skip
        print(
            f"ERROR: {what}, so the pipeline overhead (latency_ms - call_ms) cannot be "
            "computed. `call_ms` is the Claude call's own duration, which the store stage "
            "copies from Answer.call_ms into the result; the workers' code does not (yet). "
            "The figures above do not depend on it.",
            file=sys.stderr,
        )
        return 2
    if zero_call_ms:
        print(f"  WARNING: {zero_call_ms:,} fresh (not cached) answers report call_ms 0")
    if not overhead_steady:
        print("ERROR: no task submitted in the steady window completed", file=sys.stderr)
        return 1
    o = overhead_steady
    print(f"  pipeline overhead (latency_ms - call_ms), {len(o):,} tasks of the steady "
          f"window: p50 {pct(o, 0.5)} ms  p90 {pct(o, 0.9)} ms  p99 {pct(o, 0.99)} ms  "
          f"max {max(o)} ms")  # fmt: skip
    if retried:
        f = overhead_first_try
        print(f"    without retried tasks ({len(f):,}): p99 {pct(f, 0.99)} ms")
    a = overhead_all
    print(f"    all {len(a):,} tasks: p50 {pct(a, 0.5)} ms  p99 {pct(a, 0.99)} ms  max {max(a)} ms")
    ok = pct(o, 0.99) < args.target_ms and not grew and run.drained
    print(
        f"  target (overhead p99 < {args.target_ms:g} ms, no backlog growth): "
        f"{'MET' if ok else 'NOT MET'}"
    )
    print(f"overhead_p99_ms={pct(o, 0.99)}")
    return 0


def trend(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of (t, value)."""
    if len(points) < 2:
        return 0.0
    mt = sum(t for t, _ in points) / len(points)
    mv = sum(v for _, v in points) / len(points)
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / den if den else 0.0


def fmt_load(load: tuple[float, ...]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


# ---- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rate", type=float, default=116.0, help="tasks/s offered (open loop)")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of production")
    p.add_argument("--workers", type=int, default=2, help="processes running every stage")
    p.add_argument("--latency-ms", type=float, default=5000.0, help="fake's median latency")
    p.add_argument("--sigma", type=float, default=0.5, help="lognormal sigma of the latency")
    p.add_argument("--latency-cap-ms", type=float, default=120_000.0)
    p.add_argument("--redis-url", default=None,
                   help="default: a private redis-server for the run; with a URL, keys live "
                        "under a fresh prefix that is deleted at the end")  # fmt: skip
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="the pipeline's response cache (prompts are unique, so every task "
                        "misses it and calls the fake either way)")  # fmt: skip
    p.add_argument(
        "--model",
        default="mixed",
        choices=("mixed", "haiku", "sonnet", "opus"),
        help="mixed: task types routed ~70/25/5%% to haiku/sonnet/opus",
    )
    p.add_argument("--call-concurrency", type=int, default=None,
                   help="[stages.claude-call] concurrency per lane per worker "
                        "(default: the stage's own)")  # fmt: skip
    p.add_argument("--rpm", type=int, default=None, help="fake: requests/min limit")
    p.add_argument("--overloaded-rate", type=float, default=0.0, help="fake: share of 529s")
    p.add_argument("--server-error-rate", type=float, default=0.0, help="fake: share of 500s")
    p.add_argument(
        "--warmup",
        type=float,
        default=20.0,
        help="seconds before the steady window (at most a third of --duration)",
    )
    p.add_argument(
        "--tick-ms",
        type=float,
        default=10.0,
        help="the producer XADDs what is due once per tick, in one round trip (10 ms: about "
        "one task per tick at 116/s, like a fleet of independent producers; 100 ms sends "
        "bursts of 12 in the same millisecond)",
    )
    p.add_argument("--sample-every", type=int, default=5, help="seconds between samples")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the last tasks after production",
    )
    p.add_argument(
        "--backlog-bound-s",
        type=float,
        default=2.0,
        help="no growth: waiting backlog at the end <= this many seconds of tasks",
    )
    p.add_argument("--target-ms", type=float, default=50.0, help="overhead p99 target")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    if args.rate <= 0 or args.duration <= 0 or args.workers < 1 or args.sample_every < 1:
        p.error("--rate, --duration, --workers and --sample-every must be positive")
    if not 1 <= args.tick_ms <= 1000:
        p.error("--tick-ms must be in 1..1000")
    if args.drain_timeout <= 0 or args.warmup < 0:
        p.error("--drain-timeout must be positive and --warmup not negative")
    return args


def main() -> int:
    args = parse_args()
    load_before = os.getloadavg()
    tag = uuid.uuid4().hex[:8]
    prefix = f"sustained-{tag}"
    keys = Keys(prefix)
    logdir = Path(tempfile.mkdtemp(prefix="bench-sustained-"))
    server: RedisServer | None = None
    fake: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = []
    url = args.redis_url
    ok = False
    try:
        if url is None:
            server = RedisServer(logdir / "redis").start()
            url = server.url
            where = f"private redis-server {server.binary} at {url}"
        else:
            check_redis(url)
            where = f"{url.split('@')[-1]} (prefix {prefix})"
        fake, base_url = start_fake(args, logdir)
        env = worker_env(args, url, prefix, base_url, logdir)
        lanes = list(load_settings(env=env).claude.models)
        workers = start_workers(args.workers, env, logdir)
        pids = {f"w{i}": p.pid for i, p in enumerate(workers)} | {"fake": fake.pid}
        procs = {f"w{i}": p for i, p in enumerate(workers)} | {"fake": fake}
        print(f"Redis: {where}; fake API {base_url}; {args.workers} workers; logs in {logdir}; "
              f"load average {fmt_load(load_before)}", flush=True)  # fmt: skip
        run = asyncio.run(drive(url, keys, lanes, args, pids, procs, logdir, tag))
        assert run.window is not None
        w0, w1 = run.window
        cpu_window = {name: w1.cpu[name] - w0.cpu[name] for name in pids}
        rss = {name: peak_rss_mb(pid) for name, pid in pids.items()}
        redis_window_cpu = w1.redis_cpu - w0.redis_cpu
        stats = fake_stats(base_url)
        results = asyncio.run(read_results(url, keys, run.ids))
        ok = True
    except BenchError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    finally:
        stop(workers, wait_s=30)
        if fake is not None:
            stop([fake], wait_s=10)
        if server is not None:
            server.stop()
        elif url is not None:
            delete_prefix(url, keys)
        if ok:
            shutil.rmtree(logdir, ignore_errors=True)
        else:
            print(f"logs kept in {logdir}", file=sys.stderr)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return report(args, run, results, cpu_window, rss, redis_window_cpu, stats, load_before,
                  usage.ru_utime + usage.ru_stime)  # fmt: skip


def check_redis(url: str) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise BenchError(f"cannot reach Redis at {url.split('@')[-1]}: {exc}") from None
    finally:
        client.close()


def worker_env(args: argparse.Namespace, url: str, prefix: str, base_url: str,
               logdir: Path) -> dict[str, str]:  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("ANTHROPIC_AUTH_TOKEN",)}
    total = round(args.rate * args.duration)
    env |= {
        "REDIS_URL": url,
        "PIPELINE_PREFIX": prefix,
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "bench-key",
        "PIPELINE_RUNTIME__GRACE_S": "5",
        "PIPELINE_RESULTS__DONE_MAXLEN": str(max(100_000, 2 * total)),
        "PIPELINE_CACHE__ENABLED": "true" if args.cache else "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    if args.call_concurrency:
        config = logdir / "pipeline.toml"
        config.write_text(f"[stages.claude-call]\nconcurrency = {args.call_concurrency}\n")
        env["PIPELINE_CONFIG"] = str(config)
    return env


def delete_prefix(url: str, keys: Keys) -> None:
    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
        batch = list(client.scan_iter(match=keys.pattern(), count=1000))
        for i in range(0, len(batch), 500):
            client.unlink(*batch[i : i + 500])
        client.close()


if __name__ == "__main__":
    sys.exit(main())
