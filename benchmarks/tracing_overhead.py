"""What tracing costs the workers: the real four stages against the fake Claude API, with
tracing off, at 10% and at 100%.

    python benchmarks/tracing_overhead.py --tasks 20000 --rounds 5
    python benchmarks/tracing_overhead.py --trivial --tasks 30000 --rounds 3

Default (real) mode: a private redis-server, the fake Claude API in its own process (fixed
latency, --latency-ms 50, no rate limits, no injected errors) and one `python -m pipeline.cli
worker --app stages:app --stage <stage>` process per stage (cache-check, router, claude-call,
store). One process per stage, not one `--all` worker, so that each stage's CPU is read on
its own (the figures show where tracing's cost goes) and every stage span's parent really
travels in the entry from the process before, as it does when stages scale apart. Each run
preloads --tasks distinct tasks (a unique prompt each: cache-check looks each one up and
misses, so every task is routed and calls the fake; the store writes the cache as usual).

Tracing is set up only by `OTEL_*` variables, as an operator would: the parent-based ratio
sampler (`OTEL_TRACES_SAMPLER=parentbased_traceidratio`, `_ARG=0.1`, or
`parentbased_always_on` for 100%), the SDK's batch processor and OTLP/HTTP export
(`OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`) to a receiver in this process that keeps the
requests and counts their spans after the run (decoding them during the run would take
the machine's CPU from the workers). "off" sets no `OTEL_*` variable at all.

Measured: each worker's steady-state CPU per task, from /proc/<pid>/stat (user + system).
The tasks are preloaded, so the cheap first stages run ahead of claude-call: each stage is
given its own window, from when it has handled 10% of the tasks to 90% (its progress is read
every 20 ms from the streams' lengths in one MULTI: handled entries are deleted from a
stage's stream), so start-up, ramp-up and the tail are left out of every figure. The
per-task CPU of the four stages, summed, is the headline figure. Each round runs the three
modes back to back, rotated (ABC, BCA, CAB, ...) so that none always follows the same one;
the report gives each run, medians per mode and per stage, and each round's ratio to its own
"off" (paired: slow drifts of a shared machine cancel within a round) with their median.

Checks (a run that fails one stops the benchmark): every task's done event says
`completed`, nothing in the DLQ, the fake answered exactly one 200 per task and nothing
else, and the spans received: none when off, exactly 5 per task at 100% (4 stage spans + the
`chat` span), and at 10% a multiple of 5 whose trace count is within 6 sigma of 10%.

The last line is `cpu_ratio_100pct=<x> cpu_ratio_10pct=<x>` (paired medians; targets
<= 1.20 and <= 1.03).

--trivial: the former benchmark, `benchmarks/runtime.py`'s four chained trivial stages
(`benchmarks.bench_app:app`) with tracing off, at 1% and at 100% (issue 6's targets: <= 0.25
throughput lost at 100%, <= 0.05 at 1%); CPU from 5% done to 100% done.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest,
)

from benchmarks.runtime import STAGES, cpu_s, load  # noqa: E402
from pipeline.runtime.embedded_redis import RedisServer, free_port  # noqa: E402
from pipeline.runtime.keys import Keys  # noqa: E402

#: The real stages, in order, and the model family every task is sent to.
REAL_STAGES = ("cache-check", "router", "claude-call", "store")
FAMILY = "haiku"
#: Spans of one fully sampled task: four stage spans and the `chat` span of its call.
SPANS_PER_TASK = 5
TOPICS = (
    "the water cycle", "a failed database migration", "quarterly sales in Europe",
    "a customer who was double charged", "the history of the printing press",
    "a bug report about login timeouts", "solar panel efficiency", "a delayed shipment",
)  # fmt: skip


def modes(ratio: float) -> dict[str, dict[str, str]]:
    """Sampler settings per mode; "off" sets no OTEL_* variable at all."""
    return {
        "off": {},
        f"{ratio:.0%}": {
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": f"{ratio:g}",
        },
        "100%": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
    }


class SpanSink:
    """An OTLP/HTTP endpoint (keep-alive, as collectors are) that keeps the requests it is
    sent, to count their spans after a run: decoding them would take this machine's CPU
    from the workers being measured, which a collector elsewhere would not."""

    def __init__(self) -> None:
        self._bodies: list[bytes] = []
        self._counted = 0
        self._traces: set[bytes] = set()
        lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                with lock:
                    sink._bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def spans(self) -> int:
        """Spans received so far (decoding what came since the last call)."""
        bodies, self._bodies = self._bodies, []
        for body in bodies:
            request = ExportTraceServiceRequest.FromString(body)
            for r in request.resource_spans:
                for s in r.scope_spans:
                    self._counted += len(s.spans)
                    self._traces.update(span.trace_id for span in s.spans)
        return self._counted

    def take_traces(self) -> int:
        """Distinct trace ids among the spans received since the last call."""
        _ = self.spans
        n, self._traces = len(self._traces), set()
        return n

    def close(self) -> None:
        self._server.shutdown()


@dataclass
class Run:
    rate: float  # tasks/s: the last stage's rate in its window (trivial: 5% to 100% done)
    cpu_us: float  # CPU per task of the four stage processes, steady state
    spans: int
    stage_us: dict[str, float] = field(default_factory=dict)  # real mode: per stage
    whole_us: float = math.nan  # real mode: whole-run CPU per task, start-up included


# ---- trivial mode: benchmarks/runtime.py's chain ----------------------------------------


def run_trivial(
    url: str, n: int, concurrency: int, env: dict[str, str], sink: SpanSink, _: Any
) -> Run:
    """One run of benchmarks/runtime.py's four-stage chain, measuring steady-state CPU too.

    CPU per task is what matters on a shared machine: other load slows a run's wall clock
    but hardly its CPU per task. Each process's CPU is read at 5% and at 100% done, so the
    start-up (imports, connecting) counts in neither figure.
    """
    prefix = f"trace{os.getpid()}x{time.monotonic_ns()}"
    keys = Keys(prefix)
    client = redis.Redis.from_url(url)
    load(client, keys.ingress, n)
    env = {**os.environ, **env, "REDIS_URL": url, "PIPELINE_PREFIX": prefix,
           "PIPELINE_RESULTS__DONE_MAXLEN": str(n * 2), "PYTHONPATH": str(ROOT),
           # A worker whose shutdown stalls gives up after grace + 10 s.
           "PIPELINE_RUNTIME__GRACE_S": "2"}  # fmt: skip
    cmd = [sys.executable, "-m", "pipeline.cli", "worker", "--app", "benchmarks.bench_app:app",
           "-n", str(concurrency)]  # fmt: skip
    procs = [
        subprocess.Popen([*cmd, "--stage", stage], env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
        for stage in STAGES
    ]
    before = sink.spans
    try:
        while (done := client.xlen(keys.done)) < n // 20:
            time.sleep(0.005)
            if any(p.poll() is not None for p in procs):
                raise SystemExit("a worker exited early")
        start, start_done = time.perf_counter(), done
        cpu0 = sum(cpu_s(p.pid) for p in procs)
        while client.xlen(keys.done) < n:
            time.sleep(0.005)
        elapsed = time.perf_counter() - start
        cpu = sum(cpu_s(p.pid) for p in procs) - cpu0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)  # the last spans are flushed at shutdown
    for key in client.scan_iter(match=keys.pattern(), count=5000):
        client.unlink(key)
    client.close()
    steady = n - start_done
    return Run(steady / elapsed, cpu * 1e6 / steady, sink.spans - before)


# ---- real mode: the four stages against the fake Claude API ---------------------------------


class Fake:
    """The fake Claude API in its own process, for the whole benchmark."""

    def __init__(self, latency_ms: float, logdir: Path) -> None:
        port = free_port()
        cmd = [sys.executable, "-m", "pipeline.fake_claude", "--port", str(port),
               "--latency-ms", str(latency_ms), "--latency-sigma", "0"]  # fmt: skip
        with open(logdir / "fake.log", "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                self.stats()
                return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"the fake did not start; see {logdir / 'fake.log'}")
            time.sleep(0.1)

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_fake/stats", timeout=30) as response:
            stats: dict[str, Any] = json.loads(response.read())
        return stats

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)


def load_tasks(client: redis.Redis, stream: str, n: int, tag: str) -> None:
    """n distinct tasks (the run's tag and the task number make every prompt unique)."""
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        prompt = f"Summarise in two sentences: a long report on {topic} (run {tag}, task {i})."
        task = {"prompt": prompt, "type": "summarise", "model": FAMILY, "max_tokens": "300"}
        pipe.xadd(stream, task)  # type: ignore[arg-type]
        if i % 2000 == 1999:
            pipe.execute()
    pipe.execute()


@dataclass
class Mark:
    handled: int
    cpu: float
    t: float


class Progress:
    """Each stage's handled count, from one MULTI of stream lengths: a stage deletes what it
    has handled from its stream, so stage k has handled what stage k-1 handed on minus what
    is still in its own stream; the last stage's count is the done stream's length."""

    def __init__(self, client: redis.Redis, keys: Keys, n: int) -> None:
        self.client, self.n = client, n
        self.streams = [keys.ingress, keys.stream("route"), keys.stream("call", FAMILY)]
        self.done = keys.done

    def read(self) -> list[int]:
        pipe = self.client.pipeline(transaction=True)
        for stream in self.streams:
            pipe.xlen(stream)
        pipe.xlen(self.done)
        *waiting, done = pipe.execute()
        handled, before = [], self.n
        for w in waiting:
            before -= int(w)
            handled.append(before)
        return [*handled, int(done)]


def run_real(
    url: str, n: int, concurrency: int, env: dict[str, str], sink: SpanSink, fake: Fake
) -> Run:
    """One run of the four real stages, one process each, on n preloaded distinct tasks."""
    tag = uuid.uuid4().hex[:8]
    prefix = f"trace-{tag}"
    keys = Keys(prefix)
    client = redis.Redis.from_url(url)
    load_tasks(client, keys.ingress, n, tag)
    workdir = Path(tempfile.mkdtemp(prefix="bench-trace-"))
    config = workdir / "pipeline.toml"
    config.write_text(f"[stages.claude-call]\nconcurrency = {concurrency}\n")
    base = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_AUTH_TOKEN"}
    env = {**base, **env, "REDIS_URL": url, "PIPELINE_PREFIX": prefix,
           "PIPELINE_CONFIG": str(config), "ANTHROPIC_BASE_URL": fake.url,
           "ANTHROPIC_API_KEY": "sk-bench", "PIPELINE_RESULTS__DONE_MAXLEN": str(n * 2),
           "PYTHONPATH": str(ROOT),
           # A worker whose shutdown stalls gives up after grace + 10 s.
           "PIPELINE_RUNTIME__GRACE_S": "2"}  # fmt: skip
    cmd = [sys.executable, "-m", "pipeline.cli", "worker", "--app", "stages:app"]
    fake0 = fake.stats()
    spans0 = sink.spans
    sink.take_traces()
    procs = []
    for stage in REAL_STAGES:
        with open(workdir / f"{stage}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [*cmd, "--stage", stage],
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    progress = Progress(client, keys, n)
    lo, hi = n // 10, n * 9 // 10
    starts: dict[int, Mark] = {}
    ends: dict[int, Mark] = {}
    deadline = time.monotonic() + max(600.0, n / 10)
    try:
        while len(ends) < len(procs):
            handled = progress.read()
            now = time.perf_counter()
            for k, (count, p) in enumerate(zip(handled, procs, strict=True)):
                if k not in starts and count >= lo:
                    starts[k] = Mark(count, cpu_s(p.pid), now)
                elif k in starts and k not in ends and count >= hi:
                    ends[k] = Mark(count, cpu_s(p.pid), now)
            if any(p.poll() is not None for p in procs):
                raise SystemExit(f"a worker exited early; logs in {workdir}")
            if time.monotonic() > deadline:
                raise SystemExit(f"run stalled at {handled}; logs in {workdir}")
            time.sleep(0.02)
        while client.xlen(keys.done) < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {client.xlen(keys.done)}/{n} done; logs in {workdir}")
            time.sleep(0.02)
        whole = sum(cpu_s(p.pid) for p in procs)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)  # the last spans are flushed at shutdown
    statuses = Counter(
        fields.get(b"status", b"?").decode() for _, fields in client.xrange(keys.done)
    )
    dlq = client.xlen(keys.dlq)
    for key in client.scan_iter(match=keys.pattern(), count=5000):
        client.unlink(key)
    client.close()
    fake1 = fake.stats()
    check_real(n, env, statuses, dlq, fake0, fake1, sink.spans - spans0, sink.take_traces())
    stage_us = {
        stage: (ends[k].cpu - starts[k].cpu) * 1e6 / (ends[k].handled - starts[k].handled)
        for k, stage in enumerate(REAL_STAGES)
    }
    last = len(procs) - 1
    rate = (ends[last].handled - starts[last].handled) / (ends[last].t - starts[last].t)
    return Run(rate, sum(stage_us.values()), sink.spans - spans0, stage_us, whole * 1e6 / n)


def check_real(
    n: int,
    env: dict[str, str],
    statuses: Counter[str],
    dlq: int,
    fake0: dict[str, Any],
    fake1: dict[str, Any],
    spans: int,
    traces: int,
) -> None:
    """Stop the benchmark if a run did not do what it claims to measure."""
    problems = []
    if statuses != Counter({"completed": n}):
        problems.append(f"done events {dict(statuses)}, expected {n} completed")
    if dlq:
        problems.append(f"{dlq} entries in the DLQ")
    by_status = Counter(fake1["by_status"]) - Counter(fake0["by_status"])
    if by_status != Counter({"200": n}):
        problems.append(f"the fake answered {dict(by_status)}, expected {n} x 200")
    sampler = env.get("OTEL_TRACES_SAMPLER")
    if sampler is None:
        if spans:
            problems.append(f"{spans} spans received with tracing off")
    elif sampler == "parentbased_always_on":
        if spans != SPANS_PER_TASK * n or traces != n:
            problems.append(f"{spans} spans in {traces} traces, expected {5 * n} in {n}")
    else:
        p = float(env["OTEL_TRACES_SAMPLER_ARG"])
        bound = 6 * math.sqrt(n * p * (1 - p))
        if spans != SPANS_PER_TASK * traces or abs(traces - n * p) > bound:
            problems.append(
                f"{spans} spans in {traces} traces: expected 5 per trace and "
                f"{n * p:.0f} +- {bound:.0f} traces"
            )
    if problems:
        raise SystemExit("run check failed: " + "; ".join(problems))


# ---- driver -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trivial", action="store_true",
                        help="the trivial stages of benchmarks/bench_app.py instead")  # fmt: skip
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=None,
                        help="the sampled mode's ratio (default 0.1; --trivial: 0.01)")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=None,
                        help="real: claude-call's calls in flight (default 128); "
                        "--trivial: each stage's (default 512)")  # fmt: skip
    parser.add_argument("--latency-ms", type=float, default=50.0,
                        help="real: the fake's fixed latency")  # fmt: skip
    args = parser.parse_args()
    ratio = args.ratio if args.ratio is not None else (0.01 if args.trivial else 0.1)
    concurrency = args.concurrency or (512 if args.trivial else 128)
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[key]  # only what each mode sets
    mode_env = modes(ratio)
    sampled = next(m for m in mode_env if m not in ("off", "100%"))
    sink = SpanSink()
    tracing = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "tracing-overhead-bench",
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    server = RedisServer(workdir / "redis").start()
    fake = None if args.trivial else Fake(args.latency_ms, workdir)
    run_once = run_trivial if args.trivial else run_real
    what = (
        "4 trivial stages (benchmarks.bench_app) x 1 process"
        if args.trivial
        else f"4 real stages (stages:app) x 1 process, fake API {args.latency_ms:g} ms fixed, "
        f"claude-call concurrency {concurrency}"
    )
    print(f"{what}; {args.tasks:,} tasks per run, {args.rounds} rounds; python {sys.version}")
    runs: dict[str, list[Run]] = {mode: [] for mode in mode_env}
    try:
        order = list(mode_env.items())
        for round_no in range(1, args.rounds + 1):
            # Each round starts with another mode, so no mode always follows the same one.
            start = (round_no - 1) % len(order)
            for mode, sampler in order[start:] + order[:start]:
                env = {**tracing, **sampler} if sampler else {}
                run = run_once(server.url, args.tasks, concurrency, env, sink, fake)
                runs[mode].append(run)
                stages = " ".join(f"{s} {us:.0f}" for s, us in run.stage_us.items())
                print(f"round {round_no} {mode:>4}: {run.rate:,.0f} tasks/s, "
                      f"{run.cpu_us:.0f} us CPU per task (4 stages"
                      + (f": {stages}; whole run {run.whole_us:.0f}" if stages else "")
                      + f"), {run.spans:,} spans ({run.spans / args.tasks:.2f} per task), "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    finally:
        if fake is not None:
            fake.stop()
        server.stop()
        sink.close()
    report(runs, sampled, args.rounds, args.tasks, not args.trivial)


def report(runs: dict[str, list[Run]], sampled: str, rounds: int, tasks: int, real: bool) -> None:
    print(f"\nmedians over {rounds} rounds of {tasks:,} tasks:")
    rate = {m: statistics.median(r.rate for r in rs) for m, rs in runs.items()}
    cpu = {m: statistics.median(r.cpu_us for r in rs) for m, rs in runs.items()}
    for mode in runs:
        print(f"  {mode:>4}: {rate[mode]:,.0f} tasks/s (x{rate[mode] / rate['off']:.3f}), "
              f"{cpu[mode]:.0f} us CPU per task (x{cpu[mode] / cpu['off']:.3f})")  # fmt: skip
    if real:
        print(f"  per stage, median us CPU per task ({' -> '.join(runs)}):")
        for stage in REAL_STAGES:
            values = [statistics.median(r.stage_us[stage] for r in runs[m]) for m in runs]
            print(f"    {stage:>11}: " + " -> ".join(f"{v:.0f}" for v in values)
                  + f"  (+{values[-1] - values[0]:.0f} us at 100%)")  # fmt: skip

    # Paired: each round's figure against that round's "off", then the median. Slow drifts
    # of the shared machine cancel within a round, so this is the steadier estimate.
    def ratios(mode: str, name: str) -> list[float]:
        return [
            getattr(r, name) / getattr(o, name)
            for r, o in zip(runs[mode], runs["off"], strict=True)
        ]

    print("  paired by round (each round's ratio to its own 'off'; median):")
    for mode in (sampled, "100%"):
        cpu_r, rate_r = ratios(mode, "cpu_us"), ratios(mode, "rate")
        print(f"  {mode:>4}: CPU per task x{statistics.median(cpu_r):.3f} "
              f"(rounds {' '.join(f'{x:.3f}' for x in cpu_r)}); throughput "
              f"x{statistics.median(rate_r):.3f} "
              f"(rounds {' '.join(f'{x:.3f}' for x in rate_r)})")  # fmt: skip
    cpu_100 = statistics.median(ratios("100%", "cpu_us"))
    cpu_sampled = statistics.median(ratios(sampled, "cpu_us"))
    if real:
        # The cheap stages' paired differences are steadier than the total, whose noise is
        # claude-call's (~2 ms of CPU per task, which moves by 10% and more with the load).
        print("  per stage, median of each round's difference to its own 'off' (us per task):")
        for stage in REAL_STAGES:
            diffs = {
                m: statistics.median(
                    r.stage_us[stage] - o.stage_us[stage]
                    for r, o in zip(runs[m], runs["off"], strict=True)
                )
                for m in (sampled, "100%")
            }
            print(f"    {stage:>11}: " + ", ".join(f"{m} {d:+.0f}" for m, d in diffs.items()))
        print("  targets (a median within half the rounds' spread of its target is not resolved):")
        for mode, target in (("100%", 1.20), (sampled, 1.03)):
            values = ratios(mode, "cpu_us")
            median, half = statistics.median(values), (max(values) - min(values)) / 2
            verdict = (
                "MET" if median + half <= target
                else "NOT MET" if median - half > target
                else "not resolved"
            )  # fmt: skip
            print(f"    {mode:>4} <= {target:.2f}x off: x{median:.3f} +- {half:.3f}: {verdict}")
        print(f"cpu_ratio_100pct={cpu_100:.3f} cpu_ratio_{sampled[:-1]}pct={cpu_sampled:.3f}")
    else:
        print(f"overhead_100pct={1 - rate['100%'] / rate['off']:.3f} "
              f"overhead_1pct={1 - rate[sampled] / rate['off']:.3f} "
              f"cpu_overhead_100pct={cpu['100%'] / cpu['off'] - 1:.3f} "
              f"cpu_overhead_1pct={cpu[sampled] / cpu['off'] - 1:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
