"""The seed's cost arithmetic, reproduced: a 1M tasks/day workload through the real stages.

    python benchmarks/cost_workload.py --tasks 20000
    python benchmarks/cost_workload.py --tasks 20000 --deferrable 0.5   # with the batch lane

Generates a workload with the shape of the seed's example (average ~800 tokens a task, 30%
duplicates, 60% simple tasks), runs it through all four stages (`pipeline worker --all`
processes, the fake Claude API with a few ms of latency, a private redis-server unless
--redis-url), then asks `pipeline cost --tasks-per-day 1000000 --json` what a day at that
rate costs: everything on Sonnet without the cache (the baseline) versus with the response
cache and the router. Side by side, it prints what the workload's mix predicts, computed
from the generated tasks alone (not from the pipeline): each task's input tokens estimated
as ceil(prompt bytes / 4), its output as the fake's mean, priced at the default table;
duplicates are free, simple types (`classify`, `extract`) go to Haiku by the router's
default rules, the rest (`reason`, `write`) to the default family, Sonnet.

Duplicates repeat a task submitted at least --dup-gap tasks earlier and the producer keeps
at most --window tasks unfinished, so an original has completed (and been cached) when its
copy arrives. max_tokens (1024) exceeds the fake's longest answer, so every answer is
complete and cacheable. The last line is `saving_measured=<%> saving_predicted=<%>`; exit
status 0 when the per-day figures agree within --tolerance, 1 otherwise or on a setup error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.sustained import (  # noqa: E402
    BenchError,
    check_redis,
    delete_prefix,
    fake_stats,
    log_tail,
    start_fake,
    start_workers,
    stop,
)
from pipeline.claude.pricing import (  # noqa: E402
    DayPrices,
    PriceTable,
    Rates,
    micro_usd,
    today,
    usd,
)
from pipeline.claude.settings import Settings  # noqa: E402
from pipeline.claude.task import Usage  # noqa: E402
from pipeline.runtime.embedded_redis import RedisServer  # noqa: E402
from pipeline.runtime.keys import Keys  # noqa: E402

SIMPLE_TYPES = ("classify", "extract")  # the router's default rules send these to Haiku
OTHER_TYPES = ("reason", "write")  # no rule: the default family (Sonnet)
OUTPUT_TOKENS = (150, 250)  # the fake's answer length range (uniform by request hash)
MAX_TOKENS = 1024
WORDS = (
    "invoice", "customer", "shipment", "refund", "contract", "meeting", "deadline", "budget",
    "report", "ticket", "server", "outage", "release", "review", "policy", "account",
    "payment", "supplier", "schedule", "forecast", "incident", "feature", "request", "order",
)  # fmt: skip


@dataclass(frozen=True)
class Task:
    type: str
    prompt: str
    batch: bool = False  # deferrable: through the batch lane, at half price

    def fields(self) -> dict[str, str]:
        fields = {"prompt": self.prompt, "type": self.type, "max_tokens": str(MAX_TOKENS)}
        return {**fields, "batch": "true"} if self.batch else fields

    @property
    def input_tokens(self) -> int:
        return math.ceil(len(self.prompt.encode()) / 4)


def workload(n: int, duplicates: float, simple: float, gap: int, rng: random.Random,
             tag: str, deferrable: float = 0.0) -> list[Task]:  # fmt: skip
    """`n` tasks in submission order; exactly round(n * duplicates) repeat an earlier one."""
    n_dup = round(n * duplicates)
    if n_dup and n - gap < n_dup:
        raise BenchError(f"--dup-gap {gap} leaves too few positions for {n_dup} duplicates")
    dup_at = set(rng.sample(range(gap, n), n_dup))
    order: list[Task] = []
    distinct: list[tuple[int, Task]] = []  # (position, task)
    for pos in range(n):
        if pos in dup_at:
            eligible = next(i for i in range(len(distinct), 0, -1)
                            if distinct[i - 1][0] <= pos - gap)  # fmt: skip
            order.append(distinct[rng.randrange(eligible)][1])
            continue
        kind = rng.choice(SIMPLE_TYPES if rng.random() < simple else OTHER_TYPES)
        # ~600 input tokens on average (2,400 bytes), uniform 1,200..3,600 bytes
        words = [rng.choice(WORDS) for _ in range(rng.randint(150, 450))]
        batch = deferrable > 0 and rng.random() < deferrable  # (0: the same draws as before)
        task = Task(kind, f"[{tag} {pos}] {kind}: " + " ".join(words), batch)
        distinct.append((pos, task))
        order.append(task)
    return order


@dataclass
class Prediction:
    baseline_pico: int  # every task on Sonnet, no cache
    spend_pico: int  # distinct tasks only, simple ones on Haiku, deferrable ones batched
    unbatched_pico: int  # the same without the batch lane (cache + routing alone)
    tasks: int
    duplicates: int
    simple_share: float  # among distinct tasks
    avg_tokens: float


def predict(tasks: list[Task], settings: Settings) -> Prediction:
    """What the mix alone says, at the default price table."""
    prices = PriceTable.from_settings(settings).on(today())
    models = settings.claude.models
    out = sum(OUTPUT_TOKENS) // 2
    seen: set[Task] = set()
    baseline = spend = unbatched = simple = 0
    for task in tasks:
        usage = Usage(input_tokens=task.input_tokens, output_tokens=out)
        baseline += _rates(prices, models["sonnet"]).cost_pico(usage)
        if task in seen:
            continue
        seen.add(task)
        is_simple = task.type in SIMPLE_TYPES
        simple += is_simple
        model = models["haiku" if is_simple else "sonnet"]
        unbatched += _rates(prices, model).cost_pico(usage)
        spend += _rates(prices, model, batch=task.batch).cost_pico(usage)
    avg = sum(t.input_tokens + out for t in tasks) / len(tasks)
    return Prediction(baseline, spend, unbatched, len(tasks), len(tasks) - len(seen),
                      simple / len(seen), avg)  # fmt: skip


def _rates(prices: DayPrices, model: str, *, batch: bool = False) -> Rates:
    rates = prices.rates(model, batch=batch)
    assert rates is not None, model
    return rates


async def submit_all(url: str, keys: Keys, tasks: list[Task], window: int, timeout_s: float
                     ) -> float:  # fmt: skip
    """XADD in chunks, keeping at most `window` unfinished; returns seconds until all done."""
    redis = Redis.from_url(url)
    start = time.monotonic()
    try:
        chunk = max(1, window // 4)
        for i in range(0, len(tasks), chunk):
            while i - await redis.xlen(keys.done) > window - chunk:
                await asyncio.sleep(0.02)
                if time.monotonic() - start > timeout_s:
                    raise BenchError(f"timed out after {timeout_s:.0f} s at task {i}")
            pipe = redis.pipeline(transaction=False)
            for task in tasks[i : i + chunk]:
                pipe.xadd(keys.ingress, task.fields())
            await pipe.execute()
        while await redis.xlen(keys.done) < len(tasks):
            await asyncio.sleep(0.05)
            if time.monotonic() - start > timeout_s:
                raise BenchError(f"timed out after {timeout_s:.0f} s waiting for the results")
        return time.monotonic() - start
    finally:
        await redis.aclose()


def pipeline_cost(env: dict[str, str], per_day: int, as_json: bool) -> str:
    cmd = [sys.executable, "-m", "pipeline.cli", "cost", "--since", "yesterday",
           "--tasks-per-day", str(per_day), *(["--json"] if as_json else [])]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env={**env, "COLUMNS": "100"}, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    if done.returncode != 0:
        raise BenchError(f"pipeline cost failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--duplicates", type=float, default=0.30)
    p.add_argument("--simple", type=float, default=0.60, help="share of simple (Haiku) tasks")
    p.add_argument("--deferrable", type=float, default=0.0,
                   help="share of tasks that can wait (sent with batch=true)")  # fmt: skip
    p.add_argument("--tasks-per-day", type=int, default=1_000_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--window", type=int, default=2000, help="most tasks unfinished at once")
    p.add_argument("--dup-gap", type=int, default=4000)
    p.add_argument("--latency-ms", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tolerance", type=float, default=0.02, help="relative, per-day figures")
    p.add_argument("--timeout-s", type=float, default=900.0)
    p.add_argument("--redis-url", default=None, help="else a private redis-server")
    return p.parse_args()


def fake_args(args: argparse.Namespace) -> argparse.Namespace:
    """What `benchmarks.sustained.start_fake` reads: low latency, no limits, no errors."""
    return argparse.Namespace(latency_ms=args.latency_ms, sigma=0.0, latency_cap_ms=1000.0,
                              seed=args.seed, overloaded_rate=0.0, server_error_rate=0.0,
                              rpm=None)  # fmt: skip


def main() -> int:
    args = parse_args()
    tag = uuid.uuid4().hex[:8]
    keys = Keys(f"cost-{tag}")
    logdir = Path(tempfile.mkdtemp(prefix="bench-cost-"))
    tasks = workload(args.tasks, args.duplicates, args.simple, args.dup_gap,
                     random.Random(args.seed), tag, args.deferrable)  # fmt: skip
    predicted = predict(tasks, Settings())
    server: RedisServer | None = None
    procs: list[subprocess.Popen[bytes]] = []
    url = args.redis_url
    try:
        if url is None:
            server = RedisServer(logdir / "redis").start()
            url = server.url
        else:
            check_redis(url)
        fake, base_url = start_fake(fake_args(args), logdir)
        procs.append(fake)
        low, high = OUTPUT_TOKENS
        post_json(f"{base_url}/_fake/config", {"min_output_tokens": low, "max_output_tokens": high})
        env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_AUTH_TOKEN"}
        env |= {
            "REDIS_URL": url,
            "PIPELINE_PREFIX": keys.prefix,
            "ANTHROPIC_BASE_URL": base_url,
            "ANTHROPIC_API_KEY": "bench-key",
            "PIPELINE_RUNTIME__GRACE_S": "5",
            "PIPELINE_RESULTS__DONE_MAXLEN": str(2 * args.tasks),
            "PIPELINE_BATCH__MAX_WAIT_S": "1",  # a day's batches, at a benchmark's pace
            "PIPELINE_BATCH__POLL_S": "0.5",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        }
        if args.deferrable:
            post_json(f"{base_url}/_fake/config", {"batch_processing_s": 0.5})
        procs += start_workers(args.workers, env, logdir)
        print(f"{args.tasks:,} tasks ({predicted.duplicates:,} duplicates, "
              f"{predicted.simple_share:.1%} of distinct ones simple, "
              f"avg {predicted.avg_tokens:.0f} tokens); {args.workers} workers; logs {logdir}",
              flush=True)  # fmt: skip
        took = asyncio.run(submit_all(url, keys, tasks, args.window, args.timeout_s))
        stats = fake_stats(base_url) or {}
        report = json.loads(pipeline_cost(env, args.tasks_per_day, as_json=True))
        table = pipeline_cost(env, args.tasks_per_day, as_json=False)
    except BenchError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        for i in range(args.workers):
            print(f"worker {i}:\n{log_tail(logdir / f'worker-{i}.log')}", file=sys.stderr)
        return 1
    finally:
        stop(procs, wait_s=30)
        if server is not None:
            server.stop()
        elif url is not None:
            delete_prefix(url, keys)
    shutil.rmtree(logdir, ignore_errors=True)
    print(table)
    total = report["total"]
    print(f"ran {args.tasks:,} tasks in {took:.1f} s ({args.tasks / took:,.0f}/s); "
          f"API calls {stats.get('succeeded', '?'):,}; ledger: {total['requests']:,} paid, "
          f"{total['hits']:,} hits")  # fmt: skip
    per_day = report["per_day"]
    measured = (per_day["baseline_pico"], per_day["cost_pico"])
    scale = args.tasks_per_day / predicted.tasks
    expected = (round(predicted.baseline_pico * scale), round(predicted.spend_pico * scale))
    lane = f" + batch {args.deferrable:.0%}" if args.deferrable else ""
    rows = [("all-Sonnet, no cache", measured[0], expected[0]),
            (f"cache + routing{lane}", measured[1], expected[1])]  # fmt: skip
    print(f"\nper day at {args.tasks_per_day:,} tasks   {'pipeline cost':>16}  {'predicted':>16}"
          f"  {'diff':>7}")  # fmt: skip
    ok = True
    for name, got, want in rows:
        diff = (got - want) / want if want else 0.0
        ok &= abs(diff) <= args.tolerance
        print(f"{name:<28} {dollars(got):>16}  {dollars(want):>16}  {diff:>+7.2%}")
    if args.deferrable:
        unbatched = round(predicted.unbatched_pico * scale)
        print(f"{'cache + routing alone':<28} {'':>16}  {dollars(unbatched):>16}  "
              f"(the lane: -{1 - expected[1] / unbatched:.1%})")  # fmt: skip
        batch_saved = report["total"].get("batch_saved_pico", 0) * scale
        print(f"{'batch saved (pipeline cost)':<28} {dollars(round(batch_saved)):>16}")
    saving = 1 - measured[1] / measured[0] if measured[0] else 0.0
    want_saving = 1 - expected[1] / expected[0]
    ok &= abs(saving - want_saving) <= args.tolerance
    print(f"{'saving':<28} {saving:>16.2%}  {want_saving:>16.2%}  "
          f"{(saving - want_saving) * 100:>+6.2f}pt")  # fmt: skip
    print(f"saving_measured={saving:.4f} saving_predicted={want_saving:.4f}")
    return 0 if ok else 1


def dollars(pico: int) -> str:
    return f"${usd(micro_usd(pico))}"


def post_json(url: str, body: dict[str, object]) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10):
        pass


if __name__ == "__main__":
    sys.exit(main())
