"""Every Messages parameter, delivered: mixed tasks through the four real stages, counted at
the fake API.

    python benchmarks/param_delivery.py --tasks 10000

Each task is a plain XADD (as any producer sends it) with a unique prompt and a random mix of
the wire format's Messages parameters: `tools`, `tool_choice`, `thinking`, `stop_sequences`,
`top_p`, `top_k`, `service_tier`, `output_format`, `cache_control`, `user_id` and `params`
(`inference_geo`, `speed`). `pipeline worker --all` processes carry them against the fake
Claude API, which keeps the body of every request it received (`record_requests`). Then, per
task, the body that carried its prompt is compared with what the task asked for, parameter by
parameter: the table shows how many tasks sent each one and in how many it arrived intact,
and how many results carry the blocks it implies (tool_use for a forced tool choice,
thinking for extended thinking, the stop sequence that stopped it, JSON for structured
output). The last line is `delivered=<share>`; exit status 0 only at 100%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.claude_call import TOOLS  # noqa: E402
from benchmarks.sustained import (  # noqa: E402
    BenchError,
    check_redis,
    delete_prefix,
    log_tail,
    start_fake,
    start_workers,
    stop,
)
from pipeline.runtime.embedded_redis import RedisServer  # noqa: E402
from pipeline.runtime.keys import Keys  # noqa: E402

SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}


def _body(name: str, rng: random.Random, thinks: bool) -> tuple[dict[str, str], dict[str, Any]]:
    """One parameter as wire fields, and what the API must receive for it (with extended
    thinking, only what the API allows beside it: no forced tool, top_p of 0.95 or more)."""
    if name == "tools":
        return {"tools": json.dumps(TOOLS)}, {"tools": TOOLS}
    if name == "tool_choice":
        choices = [{"type": "any"}, {"type": "tool", "name": "refund"}, {"type": "auto"}]
        choice = choices[-1] if thinks else rng.choice(choices)
        return (
            {"tools": json.dumps(TOOLS), "tool_choice": json.dumps(choice)},
            {"tools": TOOLS, "tool_choice": choice},
        )
    if name == "thinking":
        thinking = {"type": "enabled", "budget_tokens": rng.choice([1024, 2048])}
        return (
            {"thinking": json.dumps(thinking), "max_tokens": "4096"},
            {"thinking": thinking, "max_tokens": 4096, "stream": True},
        )
    if name == "stop_sequences":
        stops = rng.sample(["stream", "queue", "lease", "ledger"], 2)
        return {"stop_sequences": json.dumps(stops)}, {"stop_sequences": stops}
    if name == "top_p":
        value = rng.choice([0.95, 1.0] if thinks else [0.5, 0.9, 1.0])
        return {"top_p": str(value)}, {"top_p": value}
    if name == "top_k":
        value = rng.randint(1, 100)
        return {"top_k": str(value)}, {"top_k": value}
    if name == "service_tier":
        tier = rng.choice(["auto", "standard_only"])
        return {"service_tier": tier}, {"service_tier": tier}
    if name == "output_format":
        fmt = {"type": "json_schema", "schema": SCHEMA}
        return {"output_format": json.dumps(fmt)}, {"output_config": {"format": fmt}}
    if name == "cache_control":
        control = {"type": "ephemeral", "ttl": rng.choice(["5m", "1h"])}
        return {"cache_control": json.dumps(control)}, {"cache_control": control}
    if name == "user_id":
        user = f"user-{rng.randint(1, 500)}"
        return {"user_id": user}, {"metadata": {"user_id": user}}
    params = {"inference_geo": rng.choice(["us", "eu"]), "speed": "standard"}
    return {"params": json.dumps(params)}, params


PARAMETERS = (
    "tools", "tool_choice", "thinking", "stop_sequences", "top_p", "top_k", "service_tier",
    "output_format", "cache_control", "user_id", "params",
)  # fmt: skip
Task = tuple[str, dict[str, str], dict[str, dict[str, Any]]]


def workload(n: int, rng: random.Random, tag: str) -> list[Task]:
    """(task id, wire fields, per parameter the body fields it must arrive as) per task."""
    tasks = []
    for i in range(n):
        names = [p for p in PARAMETERS if rng.random() < 0.3] or [rng.choice(PARAMETERS)]
        if "tool_choice" in names:
            names = [p for p in names if p not in ("tools", "output_format")]
        if "thinking" in names:  # the API refuses top_k beside it
            names = [p for p in names if p != "top_k"] or ["thinking"]
        prompt = f"{tag} task {i}: what is the status of order {i}?"
        fields = {"prompt": prompt, "model": "haiku", "id": f"{tag}-{i}", "cache": "false"}
        asked: dict[str, dict[str, Any]] = {}
        for name in names:
            more, asked[name] = _body(name, rng, "thinking" in names)
            fields.update(more)
        tasks.append((f"{tag}-{i}", fields, asked))
    return tasks


async def submit_and_wait(url: str, keys: Keys, tasks: list[Task], timeout_s: float) -> float:
    redis = Redis.from_url(url)
    started = time.monotonic()
    try:
        for i in range(0, len(tasks), 500):
            async with redis.pipeline(transaction=False) as pipe:
                for _, fields, _ in tasks[i : i + 500]:
                    pipe.xadd(keys.ingress, fields)  # type: ignore[arg-type]
                await pipe.execute()
        deadline = time.monotonic() + timeout_s
        while await redis.xlen(keys.done) < len(tasks):
            if time.monotonic() > deadline:
                raise BenchError(f"only {await redis.xlen(keys.done)} of {len(tasks)} results")
            await asyncio.sleep(0.5)
        return time.monotonic() - started
    finally:
        await redis.aclose()


async def results(url: str, keys: Keys, ids: list[str]) -> dict[str, dict[str, str]]:
    redis = Redis.from_url(url, decode_responses=True)
    try:
        out = {}
        for i in range(0, len(ids), 1000):
            async with redis.pipeline(transaction=False) as pipe:
                for task_id in ids[i : i + 1000]:
                    pipe.hgetall(keys.result(task_id))
                for task_id, found in zip(ids[i : i + 1000], await pipe.execute(), strict=True):
                    out[task_id] = found
        return out
    finally:
        await redis.aclose()


def answered_as_asked(asked: dict[str, dict[str, Any]], result: dict[str, str]) -> bool:
    """The result carries what the parameters imply."""
    expected = {k: v for body in asked.values() for k, v in body.items()}
    names = list(asked)
    if result.get("status") != "completed":
        return False
    kinds = [b.get("type") for b in json.loads(result.get("content") or "[]")]
    choice = expected.get("tool_choice", {}).get("type")
    if choice in ("any", "tool") and "tool_use" not in kinds:
        return False
    if "thinking" in names and kinds[:1] != ["thinking"]:
        return False
    if result.get("stop_reason") == "stop_sequence" and (
        result.get("stop_sequence") not in expected.get("stop_sequences", [])
    ):
        return False
    if "output_format" in names and result.get("stop_reason") == "end_turn":  # not a tool call
        try:
            return "label" in json.loads(result["output"])
        except ValueError:
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--redis-url", default=None, help="default: a private redis-server")
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:6]
    keys = Keys(f"params-{tag}")
    logdir = Path(tempfile.mkdtemp(prefix="bench-params-"))
    tasks = workload(args.tasks, random.Random(args.seed), tag)
    server: RedisServer | None = None
    procs: list[subprocess.Popen[bytes]] = []
    url = args.redis_url
    try:
        if url is None:
            server = RedisServer(logdir / "redis").start()
            url = server.url
        else:
            check_redis(url)
        fake_args = argparse.Namespace(latency_ms=args.latency_ms, sigma=0.0, latency_cap_ms=1000.0,
                                       seed=args.seed, overloaded_rate=0.0, server_error_rate=0.0,
                                       rpm=None)  # fmt: skip
        fake, base_url = start_fake(fake_args, logdir)
        procs.append(fake)
        _post(f"{base_url}/_fake/config", {"record_requests": args.tasks + 100})
        env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_AUTH_TOKEN"}
        env |= {
            "REDIS_URL": url, "PIPELINE_PREFIX": keys.prefix, "ANTHROPIC_BASE_URL": base_url,
            "ANTHROPIC_API_KEY": "bench-key", "PIPELINE_RUNTIME__GRACE_S": "5",
            "PIPELINE_RESULTS__DONE_MAXLEN": str(2 * args.tasks),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        }  # fmt: skip
        procs += start_workers(args.workers, env, logdir)
        print(f"{args.tasks:,} tasks, {args.workers} workers --all; logs {logdir}", flush=True)
        took = asyncio.run(submit_and_wait(url, keys, tasks, args.timeout_s))
        with urllib.request.urlopen(f"{base_url}/_fake/requests", timeout=60) as reply:
            bodies = json.loads(reply.read())["requests"]
        found = asyncio.run(results(url, keys, [task_id for task_id, _, _ in tasks]))
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
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for body in bodies:
        by_prompt.setdefault(body["messages"][-1]["content"], []).append(body)
    sent, arrived, answered = Counter[str](), Counter[str](), Counter[str]()
    # A task counts as delivered when exactly one request carried its prompt (paid once) and
    # that request held every body field its parameters ask for.
    for task_id, fields, asked in tasks:
        received = by_prompt.get(fields["prompt"], [])
        ok = answered_as_asked(asked, found.get(task_id, {}))
        for name, body in asked.items():
            sent[name] += 1
            if len(received) == 1 and all(received[0].get(k) == v for k, v in body.items()):
                arrived[name] += 1
            answered[name] += ok
    print(f"{args.tasks:,} tasks through four stages in {took:.1f} s; "
          f"the fake received {len(bodies):,} requests")  # fmt: skip
    print(f"{'parameter':<16}{'tasks':>8}{'arrived':>9}{'share':>9}{'answered':>10}")
    for name in PARAMETERS:
        share = arrived[name] / sent[name] if sent[name] else 0.0
        print(f"{name:<16}{sent[name]:>8,}{arrived[name]:>9,}{share:>9.2%}{answered[name]:>10,}")
    total_sent, total_arrived = sum(sent.values()), sum(arrived.values())
    delivered = total_arrived / total_sent if total_sent else 0.0
    print(f"{'all':<16}{total_sent:>8,}{total_arrived:>9,}{delivered:>9.2%}"
          f"{sum(answered.values()):>10,}")  # fmt: skip
    failed = Counter(
        r.get("error", "")[:90] for r in found.values() if r.get("status") != "completed"
    )
    for error, n in failed.most_common(5):
        print(f"  {n:,} failed: {error}")
    print(f"delivered={delivered:.4f}")
    return 0 if delivered == 1.0 and sum(answered.values()) == total_sent else 1


def _post(url: str, body: dict[str, object]) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10):
        pass


if __name__ == "__main__":
    sys.exit(main())
