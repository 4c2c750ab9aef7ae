"""claude-call at scale: one worker process holding thousands of Claude calls in flight.

    python benchmarks/claude_call.py --tasks 30000 --inflight 2200

Runs a private redis-server, the fake Claude API in its own process (lognormal latency,
median 5 s) and one `pipeline worker --stage claude-call` process (the real CLI, uvloop if
installed) with a single model-family lane. Routed tasks are preloaded onto the call stream;
the worker hands each answer on to the `store` stream, which nobody reads, so the worker's
process does claude-call work and nothing else.

Measured over the steady window (from the first 10% of answers to 90%, while the worker
holds its full concurrency in flight):
  - CPU ms per completed call of the worker process, from /proc/<pid>/stat (user + system);
  - event-loop lag inside the worker: this module is also the worker's App, and its stage
    wraps claude-call's handler factory to start a probe task on the worker's own loop
    (sleep 20 ms, record the overshoot; ~50 wake-ups/s, a negligible share of the CPU);
  - connection errors: non-200 answers counted by the fake, plus the TransientErrors the
    worker's handler raised (connection errors and timeouts), which the probe also counts;
  - full (gen-2) GC pauses, from `gc.callbacks` in the worker: with the default thresholds
    they were what the lag p99 was made of. The worker now freezes its start-up heap and
    raises the young-generation threshold itself (`pipeline/worker.py`); `--gc-tuned` only
    applies the same settings a second time and is kept for comparison runs.
The last line is `cpu_ms_per_call=<n>` (of the first mode).

`--modes text,tools,streamed,tools-streamed` runs the same workload once per mode, side by
side in one run (this machine is noisy), and prints each mode's CPU per call as a ratio to
the first: `tools` sends two tool definitions with `tool_choice` auto (the fake answers with
a text block and a `tool_use` block), `streamed` has every call streamed (server-sent events
assembled into the message), `tools-streamed` both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline import App, Handler, Message, Outcome, Services, Stage, TransientError  # noqa: E402
from pipeline.claude.config import load_settings  # noqa: E402
from pipeline.claude.task import Request, Routed  # noqa: E402
from pipeline.runtime.embedded_redis import RedisServer, free_port  # noqa: E402
from pipeline.runtime.keys import Keys  # noqa: E402
from pipeline.runtime.wire import (  # noqa: E402
    ENVELOPE_FIELD,
    WIRE_VERSION,
    Envelope,
    encode_body,
    encode_envelope,
)
from stages import claude_call  # noqa: E402

FAMILY, MODEL = "haiku", "claude-haiku-5-5"
PROBE_FILE = "BENCH_PROBE_FILE"
PROBE_EVERY_S = 0.02
GC_TUNED_ENV = "BENCH_GC_TUNED"


def tune_gc() -> None:
    """What this benchmark proposes the worker do once its handlers are built (--gc-tuned).

    Thousands of calls in flight keep ~0.5M objects alive; with the default thresholds
    they are promoted to the oldest generation and full collections (~0.4 s each here)
    stall the loop every few seconds. Freezing the start-up heap and a larger young
    generation let in-flight objects die young instead.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


# ---- inside the worker: the App, with a lag probe around claude-call's handler ----------


async def _probe(path: str, errors: Counter[str]) -> None:
    """Event-loop lag samples and handler errors, appended to `path` once a second."""
    lags: list[float] = []
    gc_ms: list[float] = []
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif info["generation"] == 2:
            gc_ms.append((time.perf_counter() - started[0]) * 1000)

    gc.callbacks.append(on_gc)
    flushed = time.monotonic()
    while True:
        before = time.monotonic()
        await asyncio.sleep(PROBE_EVERY_S)
        now = time.monotonic()
        lags.append((now - before - PROBE_EVERY_S) * 1000)
        if now - flushed >= 1.0:
            row = {"t": time.time(), "lag_ms": lags, "gc2_ms": gc_ms, "errors": dict(errors)}
            _append(path, row)
            lags, gc_ms, flushed = [], [], now


def _append(path: str, row: dict[str, Any]) -> None:
    with open(path, "a") as out:  # a few KB once a second: no need to leave the loop
        out.write(json.dumps(row) + "\n")


async def _probed_build(services: Services) -> Handler:
    handle = await claude_call.build(services)
    path = os.environ.get(PROBE_FILE)
    if not path:
        return handle
    errors: Counter[str] = Counter()
    task = asyncio.get_running_loop().create_task(_probe(path, errors))
    if os.environ.get(GC_TUNED_ENV):
        tune_gc()

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    services.on_close(stop)

    async def counted(msg: Message) -> Outcome:
        try:
            return await handle(msg)
        except TransientError as exc:
            errors[re.sub(r" \(request-id .*\)$", "", str(exc))] += 1
            raise

    return counted


def _app() -> App:
    stage = claude_call.stage(load_settings())
    store = Stage("store", "store", handler=_never)
    return App([dataclasses.replace(stage, build=_probed_build), store])


async def _never(msg: Message) -> Outcome:
    raise RuntimeError("the benchmark runs no store worker")


app = _app()

# ---- the driver -------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65_536 if hard == resource.RLIM_INFINITY else min(65_536, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


TOOLS = [
    {
        "name": "lookup_order",
        "description": "Look an order up by its id.",
        "input_schema": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}, "verbose": {"type": "boolean"}},
            "required": ["order_id"],
        },
    },
    {
        "name": "refund",
        "description": "Refund an order.",
        "input_schema": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}, "amount": {"type": "number"}},
            "required": ["order_id", "amount"],
        },
    },
]
MODES = ("text", "tools", "streamed", "tools-streamed")


def preload(client: redis.Redis, stream: str, n: int, mode: str = "text") -> None:
    """n Routed tasks straight onto the call stream, as the router would hand them on."""
    now = int(time.time() * 1000)
    pipe = client.pipeline(transaction=False)
    params: dict[str, Any] = {}
    if mode.startswith("tools"):
        params = {"tools": TOOLS, "tool_choice": {"type": "auto"}}
    for i in range(n):
        text = f"task {i}: summarise this paragraph about streams and leases. " * 8
        request = Request(
            messages=[{"role": "user", "content": text}], type="summarise", params=params
        )
        body = Routed(request=request, family=FAMILY, model=MODEL, max_tokens=300)
        env = Envelope(
            v=WIRE_VERSION, task_id=f"b{i}", fields={"prompt": text}, attempt=1,
            origin_ms=now, enqueued_ms=now, body=encode_body(body),
        )  # fmt: skip
        pipe.xadd(stream, {ENVELOPE_FIELD: encode_envelope(env)})
        if i % 2000 == 1999:
            pipe.execute()
    pipe.execute()


def fake_stats(base_url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/_fake/stats", timeout=30) as response:
        stats: dict[str, Any] = json.loads(response.read())
    return stats


def start_fake(
    latency_ms: float, sigma: float, logdir: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "pipeline.fake_claude", "--port", str(port),
           "--latency-ms", str(latency_ms), "--latency-sigma", str(sigma)]  # fmt: skip
    log = open(logdir / "fake.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=_raise_nofile)  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError):
            fake_stats(base_url)
            return proc, base_url
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"the fake did not start; see {logdir / 'fake.log'}")
        time.sleep(0.1)


@dataclasses.dataclass
class Window:
    t0: float
    t1: float
    done0: int
    done1: int
    cpu0: float
    cpu1: float
    pending: list[int]


def watch(
    client: redis.Redis, keys: Keys, pid: int, n: int, proc: subprocess.Popen[bytes]
) -> Window:
    """Follow the answers; mark the steady window (10% -> 90% of n)."""
    stream, store = keys.stream("call", FAMILY), keys.stream("store")
    marks: dict[str, tuple[float, int, float]] = {}
    pending: list[int] = []
    while True:
        done = client.xlen(store)
        now = time.time()
        if "start" not in marks and done >= n // 10:
            marks["start"] = (now, done, cpu_s(pid))
        elif "start" in marks:
            with contextlib.suppress(redis.ResponseError):
                pending.append(int(client.xpending(stream, "claude-call")["pending"]))
            if done >= n * 9 // 10:
                marks["end"] = (now, done, cpu_s(pid))
                break
        if proc.poll() is not None:
            raise SystemExit("the worker exited early")
        time.sleep(0.25)
    (t0, d0, c0), (t1, d1, c1) = marks["start"], marks["end"]
    return Window(t0, t1, d0, d1, c0, c1, pending)


def probed(path: Path, t0: float, t1: float) -> tuple[list[float], list[float], Counter[str]]:
    """Loop lags and full-GC pauses inside the window, and the worker's error totals."""
    lags: list[float] = []
    gc2: list[float] = []
    errors: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if t0 <= row["t"] <= t1 + 1:
            lags.extend(row["lag_ms"])
            gc2.extend(row["gc2_ms"])
        errors = Counter(row["errors"])  # cumulative: the last line has the totals
    return lags, gc2, errors


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


def run(args: argparse.Namespace, url: str, workdir: Path, mode: str = "text") -> float:
    workdir.mkdir(parents=True, exist_ok=True)
    fake, base_url = start_fake(args.latency_ms, args.sigma, workdir)
    prefix = f"bcc{os.getpid()}{mode.replace('-', '')}"
    keys = Keys(prefix)
    client = redis.Redis.from_url(url)
    preload(client, keys.stream("call", FAMILY), args.tasks, mode)
    config = workdir / f"pipeline-{mode}.toml"
    stream_from = 1 if mode.endswith("streamed") else 64_000
    config.write_text(
        f'[claude]\nbase_url = "{base_url}"\ntimeout_s = 120\nmodels = {{ {FAMILY} = "{MODEL}" }}\n'
        f"stream_from_max_tokens = {stream_from}\n"
        f'[router]\ndefault_family = "{FAMILY}"\n'
        f'[stages.claude-call]\nconcurrency = {args.inflight}\nread_count = 512\n'
    )  # fmt: skip
    probe = workdir / "probe.jsonl"
    env = {
        **os.environ,
        "REDIS_URL": url,
        "PIPELINE_PREFIX": prefix,
        "PIPELINE_CONFIG": str(config),
        "ANTHROPIC_API_KEY": "sk-bench",
        PROBE_FILE: str(probe),
        GC_TUNED_ENV: "1" if args.gc_tuned else "",
        "PYTHONPATH": str(ROOT),
    }
    cmd = [sys.executable, "-m", "pipeline.cli", "worker", "--app", "benchmarks.claude_call:app",
           "--stage", "claude-call"]  # fmt: skip
    worker_log = open(workdir / "worker.log", "wb")  # noqa: SIM115
    started = time.time()
    worker = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=worker_log, stderr=subprocess.STDOUT,
                              preexec_fn=_raise_nofile)  # fmt: skip
    try:
        window = watch(client, keys, worker.pid, args.tasks, worker)
        total_cpu = cpu_s(worker.pid)
        total_done = client.xlen(keys.stream("store"))
        wall = time.time() - started
    finally:
        worker.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.wait(60)
        stats = fake_stats(base_url)
        fake.send_signal(signal.SIGTERM)
        fake.wait(30)
        with contextlib.suppress(redis.RedisError):
            for key in client.scan_iter(match=keys.pattern(), count=5000):
                client.unlink(key)
        client.close()
    lags, gc2, errors = probed(probe, window.t0, window.t1)
    calls = window.done1 - window.done0
    seconds = window.t1 - window.t0
    cpu_ms = (window.cpu1 - window.cpu0) * 1000 / calls
    not_ok = {code: n for code, n in stats["by_status"].items() if code != "200"}
    head = (
        f"[{mode}] claude-call worker, 1 process, {args.tasks:,} tasks, concurrency {args.inflight}"
    )
    print(f"{head}, fake latency median {args.latency_ms:.0f} ms (lognormal sigma {args.sigma})")
    print(f"  steady window: {calls:,} calls in {seconds:.1f}s = {calls / seconds:,.0f} calls/s")
    print(f"  in flight (pending) in window: min {min(window.pending)}, "
          f"median {statistics.median(window.pending):.0f}, max {max(window.pending)}; "
          f"fake inflight_max {stats['inflight_max']}")  # fmt: skip
    print(f"  worker CPU: {cpu_ms:.2f} ms per call in window "
          f"({total_cpu * 1000 / max(1, total_done):.2f} ms over the whole run of {wall:.0f}s, "
          f"start-up included)")  # fmt: skip
    print(f"  event-loop lag ({len(lags)} samples): p50 {pct(lags, 50):.1f} ms, "
          f"p99 {pct(lags, 99):.1f} ms, max {max(lags, default=float('nan')):.1f} ms")  # fmt: skip
    print(f"  full (gen-2) GC in window: {len(gc2)}, longest {max(gc2, default=0):.0f} ms"
          f"{' (gc tuned)' if args.gc_tuned else ''}")  # fmt: skip
    print(f"  fake: {stats['requests_total']:,} requests, non-200 {not_ok or 'none'}, "
          f"client_gone {stats['client_gone']}, max calls per request "
          f"{stats['max_calls_per_request']}")  # fmt: skip
    print(f"  worker transient errors: {dict(errors) or 'none'}")
    seen = stats.get("params_seen", {})
    print(f"  parameters the fake received: {seen or 'not reported'}")
    print(f"lag_p99_ms={pct(lags, 99):.1f}")
    print(f"connection_errors={sum(not_ok.values()) + sum(errors.values())}")
    return cpu_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=30_000)
    parser.add_argument("--inflight", type=int, default=2200,
                        help="claude-call concurrency (calls in flight) of the worker")  # fmt: skip
    parser.add_argument("--latency-ms", type=float, default=5000.0, help="median fake latency")
    parser.add_argument("--sigma", type=float, default=0.5, help="lognormal sigma of latency")
    parser.add_argument("--gc-tuned", action="store_true",
                        help="apply tune_gc() again (the worker already does)")  # fmt: skip
    parser.add_argument("--modes", default="text",
                        help=f"comma-separated: {','.join(MODES)}")  # fmt: skip
    parser.add_argument("--redis-url", default=None,
                        help="default: a private redis-server started for the run")  # fmt: skip
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-claude-call-"))
    server = None
    url = args.redis_url
    if url is None:
        server = RedisServer(workdir / "redis").start()
        url = server.url
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown mode {unknown[0]!r} (one of {', '.join(MODES)})")
    results: dict[str, float] = {}
    try:
        for mode in modes:
            results[mode] = run(args, url, workdir / mode if len(modes) > 1 else workdir, mode)
    finally:
        if server:
            server.stop()
    print(f"logs in {workdir}")
    if len(results) > 1:
        base = results[modes[0]]
        print(f"{'mode':<16}{'CPU ms/call':>12}{'ratio':>8}")
        for mode, cpu_ms in results.items():
            print(f"{mode:<16}{cpu_ms:>12.2f}{cpu_ms / base:>8.2f}")
    print(f"cpu_ms_per_call={results[modes[0]]:.2f}")


if __name__ == "__main__":
    main()
