"""What one task's five spans cost through the OpenTelemetry SDK, in instructions.

    python benchmarks/tracing_spans.py                 # instructions per task (callgrind)
    python benchmarks/tracing_spans.py --cpu           # CPU per task instead (noisy)

A task's spans exactly as a worker makes them, without the worker: `observability.tracing.
Tracing` on the provider the `OTEL_*` variables describe (the SDK's `TracerProvider`, its
batch processor and OTLP/HTTP exporter, sending to a receiver in this process), for the four
stages' `process` spans, each continuing the one before from its traceparent, and the
`chat` span of the call. Everything else a worker does is left out, so this says what the
SDK's path costs, and how much each change to it saves; `tracing_overhead.py` says what
tracing costs the real workers.

Each figure is (I(2N) - I(N)) / N over runs of N and 2N tasks under callgrind (all threads:
the export thread's encoding counts), so start-up cancels out. Needs valgrind.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("cache-check", "router", "claude-call", "store")


def run_tasks(n: int) -> float:
    """Make n tasks' spans and export them all; the CPU seconds that took."""
    from observability.otel import tracer_provider_from_env
    from observability.tracing import Tracing
    from pipeline.claude.task import Usage
    from pipeline.runtime.calls import CallReport
    from pipeline.runtime.keys import Keys
    from pipeline.runtime.stage import App, Message, Stage
    from pipeline.runtime.wire import Envelope

    async def handler(msg: Message) -> None:
        raise AssertionError("not run")

    app = App([Stage(name, name, handler) for name in STAGES])  # type: ignore[arg-type]
    provider = tracer_provider_from_env(os.environ, "tracing-spans-bench")
    tracing = Tracing(provider, app, Keys("pipeline"))
    usage = Usage(input_tokens=120, output_tokens=40)

    def one(i: int) -> None:
        traceparent = None
        for stage in STAGES:
            env = Envelope(1, f"task-{i}", {}, 1, 0, 0, traceparent)
            span = tracing.start_span(Message(env, f"1700000000000-{i}", stage, None, 1))
            assert span is not None
            context = span.task_context()
            if stage == "claude-call" and context is not None:
                now = time.time_ns()
                report = CallReport("haiku", "claude-haiku-4-5", "claude-haiku-4-5", 1024, 200,
                                    now - 1_000_000, now, usage, None)  # fmt: skip
                context.run(tracing.on_call, report)
            traceparent, _ = span.handoff("forward", "next", None)
            span.finish(None)

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    one(-1)
    provider.force_flush()
    started = cpu()
    for i in range(n):
        one(i)
    provider.force_flush()
    spent = cpu() - started
    provider.shutdown()
    return spent


def instructions(n: int, env: dict[str, str], workdir: Path) -> int:
    out = workdir / f"callgrind.{n}"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
           sys.executable, __file__, "--child", str(n)]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    found = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
    assert found, f"no total in {out}"
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--cpu", action="store_true", help="CPU per task, not instructions")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        run_tasks(args.child)
        return
    from benchmarks.tracing_overhead import SpanSink

    sink = SpanSink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=sink.endpoint,
        PYTHONPATH=str(ROOT),
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_BSP_MAX_QUEUE_SIZE=str(max(2048, 10 * args.tasks)),
    )  # none dropped
    try:
        if args.cpu:
            os.environ.update(env)
            spent = run_tasks(args.tasks)
            print(f"{spent / args.tasks * 1e6:,.0f} us CPU per task (5 spans), "
                  f"{sink.spans:,} spans received")  # fmt: skip
            return
        if shutil.which("valgrind") is None:
            raise SystemExit("needs valgrind (or pass --cpu)")
        with tempfile.TemporaryDirectory() as tmp:
            small = instructions(args.tasks, env, Path(tmp))
            large = instructions(2 * args.tasks, env, Path(tmp))
        per_task = (large - small) / args.tasks
        print(f"{per_task:,.0f} instructions per task (5 spans), "
              f"{per_task / 5:,.0f} per span; {sink.spans:,} spans received")  # fmt: skip
        print(f"instructions_per_task={per_task:.0f}")
    finally:
        sink.close()


if __name__ == "__main__":
    main()
