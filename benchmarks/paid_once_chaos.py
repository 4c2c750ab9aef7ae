"""Paid once under chaos, at scale: the combined chaos test's run at 10,000 tasks by default.

    python benchmarks/paid_once_chaos.py                  # 10,000 tasks over 400 s
    python benchmarks/paid_once_chaos.py --kill-for-s 20  # the test's 10 SIGKILLs only
    python benchmarks/paid_once_chaos.py --tasks 1000 --submit-s 40 --kill-for-s 20

10,000 tasks over 400 s is the test's rate (25 tasks/s) for ten times as long; SIGKILLs every
2 s for the first half of it by default (~100 kills), then the rolling restart.

The same run as `tests/chaos/test_paid_once_chaos.py` (`tests/helpers/paid_once_chaos.py`):
the four stages as `pipeline worker` subprocesses against the fake Claude API in this process
(calls of ~1.5 s) and a private redis-server (or --redis-url, under a fresh key prefix deleted
at the end), the same workload mix (20% repeated requests, 5% re-submitted ids, budget-
downgraded `premium` tasks) and the same faults (a SIGKILL every 2 s, a rolling SIGTERM
restart of every worker, one claude-call worker SIGSTOPped for twice the lease), then a table
of the counts: tasks, results, duplicate ids submitted, duplicate paid calls (and what excuses
them), client_gone, the stalled worker's calls, ledger vs fake tokens, wall time.

Exit status: 0 when every check held, 1 when one failed (each is printed), 2 on a setup error.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from pipeline.runtime.embedded_redis import RedisServer  # noqa: E402
from pipeline.runtime.keys import Keys  # noqa: E402
from tests.conftest import FAST  # noqa: E402
from tests.helpers.paid_once_chaos import ChaosConfig, chaos_fake, run_chaos  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--tasks", type=int, default=10_000, help="distinct task ids")
    p.add_argument("--submit-s", type=float, default=400.0, help="producer's pacing window")
    p.add_argument(
        "--kill-for-s", type=float, help="SIGKILLs for this long (default: half the pacing window)"
    )
    p.add_argument("--roll-after-s", type=float, help="rolling restart from then (default: "
                   "after the SIGKILLs; they overlap if you say so)")  # fmt: skip
    p.add_argument("--call-workers", type=int, default=4, help="claude-call processes")
    p.add_argument("--other-workers", type=int, default=2, help="processes per other stage")
    p.add_argument("--latency-ms", type=float, default=1500.0, help="fake call latency")
    p.add_argument("--finish-timeout-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--redis-url", help="use this Redis instead of a private redis-server")
    p.add_argument("--keep", action="store_true", help="keep the logs folder when all held")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    base = ChaosConfig()
    kill_for = args.submit_s / 2 if args.kill_for_s is None else args.kill_for_s
    roll_after = base.kill_from_s + kill_for + 1 if args.roll_after_s is None else args.roll_after_s
    cfg = dataclasses.replace(
        base,
        tasks=args.tasks,
        submit_s=args.submit_s,
        kill_for_s=kill_for,
        roll_after_s=roll_after,
        call_workers=args.call_workers,
        other_workers=args.other_workers,
        latency_ms=args.latency_ms,
        finish_timeout_s=args.finish_timeout_s,
        seed=args.seed,
    )
    workdir = Path(tempfile.mkdtemp(prefix="paid-once-chaos-"))
    server: RedisServer | None = None
    remove = False
    prefix = f"chaos{uuid.uuid4().hex[:8]}"
    try:
        url = args.redis_url
        if url is None:
            server = RedisServer(workdir / "redis").start()
            url = server.url
        env = {"REDIS_URL": url, "PIPELINE_PREFIX": prefix, **FAST}
        started = time.monotonic()
        with chaos_fake(cfg) as fake:
            report = run_chaos(cfg, env, workdir, fake)
        print()
        print(report.table())
        print(f"(whole run incl. start and stop: {time.monotonic() - started:.0f}s; worker "
              f"logs, fake_stats.json and fleet.json in {workdir})")  # fmt: skip
        problems = report.problems()
        for line in problems:
            print(f"FAILED: {line}")
        print("all checks held" if not problems else f"{len(problems)} checks failed")
        remove = not problems and not args.keep
        return 1 if problems else 0
    except Exception as exc:
        print(f"setup error: {exc!r} (logs in {workdir})", file=sys.stderr)
        return 2
    finally:
        if args.redis_url is not None:
            client = redis.Redis.from_url(args.redis_url)
            keys = list(client.scan_iter(match=Keys(prefix).pattern(), count=1000))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i : i + 500])
            client.close()
        if server is not None:
            server.stop()
        if remove:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
