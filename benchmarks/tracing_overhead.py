"""What tracing costs the runtime: benchmarks/runtime.py with tracing off, at 1% and at 100%.

    python benchmarks/tracing_overhead.py --tasks 30000 --rounds 3

Each round runs the three modes back to back (interleaved, so machine noise hits them
alike) through four chained trivial stages, one worker process per stage. Tracing is set
up only by `OTEL_*` variables, as an operator would: parent-based ratio sampling, the batch
processor, and OTLP/HTTP export to a receiver in this process that counts the spans and
throws them away, so encoding and sending are paid for but no collector is needed. Prints
each run, then the medians against "off": throughput lost, and steady-state CPU per task
(the sturdier figure on a shared machine). The last line is `overhead_100pct=<fraction>
overhead_1pct=<fraction> cpu_overhead_100pct=… cpu_overhead_1pct=…`. Target (issue 6):
<= 0.25 at 100%, <= 0.05 at 1%.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest,
)

from benchmarks.runtime import STAGES, cpu_s, load  # noqa: E402
from pipeline.runtime.embedded_redis import RedisServer  # noqa: E402
from pipeline.runtime.keys import Keys  # noqa: E402

#: Sampler settings per mode; "off" sets no OTEL_* variable at all.
MODES: dict[str, dict[str, str]] = {
    "off": {},
    "1%": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "100%": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
}


class SpanSink:
    """An OTLP/HTTP endpoint (keep-alive, as collectors are) that keeps the requests it is
    sent, to count their spans after a run: decoding them would take this machine's CPU
    from the workers being measured, which a collector elsewhere would not."""

    def __init__(self) -> None:
        self._bodies: list[bytes] = []
        self._counted = 0
        lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
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
            self._counted += sum(len(s.spans) for r in request.resource_spans
                                 for s in r.scope_spans)  # fmt: skip
        return self._counted

    def close(self) -> None:
        self._server.shutdown()


@dataclass
class Run:
    rate: float  # tasks/s from 5% to 100% done (start-up left out, as in runtime.py)
    cpu_us: float  # CPU of the four stage processes per task over the same span
    spans: int


def run_once(url: str, n: int, concurrency: int, env: dict[str, str], sink: SpanSink) -> Run:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=512)
    args = parser.parse_args()
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[key]  # only what each mode sets
    sink = SpanSink()
    tracing = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "tracing-overhead-bench",
    }
    server = RedisServer(Path(tempfile.mkdtemp(prefix="bench-redis-"))).start()
    runs: dict[str, list[Run]] = {mode: [] for mode in MODES}
    try:
        modes = list(MODES.items())
        for round_no in range(1, args.rounds + 1):
            # Each round starts with another mode, so no mode always follows the same one.
            start = (round_no - 1) % len(modes)
            for mode, sampler in modes[start:] + modes[:start]:
                env = {**tracing, **sampler} if sampler else {}
                run = run_once(server.url, args.tasks, args.concurrency, env, sink)
                runs[mode].append(run)
                print(f"round {round_no} {mode:>4}: {run.rate:,.0f} tasks/s, "
                      f"{run.cpu_us:.0f} us CPU per task (4 stages), {run.spans:,} spans "
                      f"exported ({run.spans / args.tasks:.2f} per task)", flush=True)  # fmt: skip
    finally:
        server.stop()
        sink.close()
    print(f"\nmedians over {args.rounds} rounds of {args.tasks:,} tasks (4 stages x 1 process):")
    rate = {m: statistics.median(r.rate for r in rs) for m, rs in runs.items()}
    cpu = {m: statistics.median(r.cpu_us for r in rs) for m, rs in runs.items()}
    for mode in MODES:
        print(f"  {mode:>4}: {rate[mode]:,.0f} tasks/s ({1 - rate[mode] / rate['off']:+.1%} "
              f"throughput lost), {cpu[mode]:.0f} us CPU per task "
              f"({cpu[mode] / cpu['off'] - 1:+.1%})")  # fmt: skip

    # Paired: each round's figure against that round's "off", then the median. Slow drifts
    # of the shared machine cancel within a round, so this is the steadier estimate.
    def paired(mode: str, field: str) -> float:
        ratios = [
            getattr(r, field) / getattr(o, field)
            for r, o in zip(runs[mode], runs["off"], strict=True)
        ]
        return statistics.median(ratios)

    print("  paired by round (median of each round's ratio to its own 'off'):")
    for mode in ("1%", "100%"):
        print(f"  {mode:>4}: {1 - paired(mode, 'rate'):+.1%} throughput lost, "
              f"{paired(mode, 'cpu_us') - 1:+.1%} CPU per task")  # fmt: skip
    print(f"overhead_100pct={1 - rate['100%'] / rate['off']:.3f} "
          f"overhead_1pct={1 - rate['1%'] / rate['off']:.3f} "
          f"cpu_overhead_100pct={cpu['100%'] / cpu['off'] - 1:.3f} "
          f"cpu_overhead_1pct={cpu['1%'] / cpu['off'] - 1:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
