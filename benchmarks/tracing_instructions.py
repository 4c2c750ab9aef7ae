"""What tracing costs a stage, in CPU instructions per entry: a figure machine noise cannot move.

    python benchmarks/tracing_instructions.py --tasks 2000

Needs valgrind. Runs one worker process of `benchmarks/bench_app.py` under callgrind, for the
first stage (`s1`: every entry starts a trace) and a later one (`s2`: every entry continues
one), with tracing off, at 1% and at 100%, as `tracing_overhead.py` sets them (OTLP/HTTP to a
receiver in this process). Each stage's input is made by the stages before it, untimed, in
the same mode, so it carries what it would carry. Each figure is (I(2N) - I(N)) / N: the
instructions of a run over 2N entries less those of a run over N, per entry, so start-up and
shutdown cancel out. Callgrind counts the worker's own instructions (all its threads), not
Redis's or the kernel's, and not cache misses: the wall-clock figures of
`tracing_overhead.py` remain the ones the targets are stated in; these say where they come
from. The last line is `s1_100pct=<fraction> s2_100pct=… chain_100pct=… chain_1pct=…`, the
chain estimate weighting s1 once and s2 three times (four stages).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.runtime import load  # noqa: E402
from benchmarks.tracing_overhead import SpanSink, modes  # noqa: E402
from pipeline.runtime.embedded_redis import RedisServer  # noqa: E402
from pipeline.runtime.keys import Keys  # noqa: E402

MODES = modes(0.01)

CHAIN = ("s1", "s2", "s3", "s4")


class Bench:
    def __init__(self, url: str, sink: SpanSink, workdir: Path) -> None:
        self.client = redis.Redis.from_url(url)
        self.workdir = workdir
        self.keys = Keys(f"instr{os.getpid()}")
        tracing = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": "tracing-instructions-bench",
        }
        self.modes = {mode: {**tracing, **env} if env else {} for mode, env in MODES.items()}
        self.env = {**os.environ, "REDIS_URL": url, "PIPELINE_PREFIX": self.keys.prefix,
                    "PYTHONPATH": str(ROOT), "PIPELINE_RUNTIME__GRACE_S": "2"}  # fmt: skip
        self.cmd = [sys.executable, "-m", "pipeline.cli", "worker", "--app",
                    "benchmarks.bench_app:app", "-n", "512"]  # fmt: skip

    def stream_of(self, stage: str) -> str:
        return self.keys.ingress if stage == "s1" else self.keys.stream(stage)

    def output_of(self, stage: str) -> str:
        following = CHAIN.index(stage) + 1
        return self.keys.done if following == len(CHAIN) else self.keys.stream(CHAIN[following])

    def clear(self) -> None:
        for key in self.client.scan_iter(match=self.keys.pattern(), count=5000):
            self.client.unlink(key)

    def make_input(self, stage: str, mode: str, n: int) -> None:
        """The entries `stage` reads, made by the stages before it (not measured)."""
        self.clear()
        load(self.client, self.keys.ingress, n)
        for before in CHAIN[: CHAIN.index(stage)]:
            self.run(before, mode, n)

    def run(self, stage: str, mode: str, n: int, callgrind: Path | None = None) -> None:
        """One worker for `stage` until n entries are out, then SIGTERM (a clean exit)."""
        prefix = [] if callgrind is None else ["valgrind", "--tool=callgrind",
                                               f"--callgrind-out-file={callgrind}"]  # fmt: skip
        env = {**self.env, **self.modes[mode], "PIPELINE_RESULTS__DONE_MAXLEN": str(n * 2)}
        proc = subprocess.Popen([*prefix, *self.cmd, "--stage", stage], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            while self.client.xlen(self.output_of(stage)) < n:
                if proc.poll() is not None:
                    raise SystemExit(f"the {stage} worker exited early ({mode})")
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(600)

    def instructions(self, stage: str, mode: str, n: int) -> float:
        """(I(2N) - I(N)) / N for `stage` in `mode`."""
        counts = []
        for size in (n, 2 * n):
            self.make_input(stage, mode, size)
            out = self.workdir / f"callgrind.{stage}.{mode.rstrip('%')}.{size}"
            self.run(stage, mode, size, callgrind=out)
            totals = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.M)
            if totals is None:
                raise SystemExit(f"no totals in {out}")
            counts.append(int(totals.group(1)))
        return (counts[1] - counts[0]) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="N (runs of N and 2N entries)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[key]
    workdir = Path(tempfile.mkdtemp(prefix="tracing-instructions-"))
    server = RedisServer(workdir / "redis").start()
    sink = SpanSink()
    per_entry: dict[tuple[str, str], float] = {}
    try:
        bench = Bench(server.url, sink, workdir)
        for stage in ("s1", "s2"):
            for mode in MODES:
                per_entry[stage, mode] = figure = bench.instructions(stage, mode, args.tasks)
                off = per_entry[stage, "off"]
                print(f"{stage} {mode:>4}: {figure:9,.0f} instructions per entry "
                      f"({figure / off - 1:+.1%})", flush=True)  # fmt: skip
    finally:
        sink.close()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    def chain(mode: str) -> float:
        return per_entry["s1", mode] + 3 * per_entry["s2", mode]

    over = {m: chain(m) / chain("off") - 1 for m in MODES}
    print(f"four-stage estimate (s1 + 3 x s2): 1% {over['1%']:+.1%}, 100% {over['100%']:+.1%}")
    s1, s2 = (per_entry[s, "100%"] / per_entry[s, "off"] - 1 for s in ("s1", "s2"))
    print(f"s1_100pct={s1:.3f} s2_100pct={s2:.3f} chain_100pct={over['100%']:.3f} "
          f"chain_1pct={over['1%']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
