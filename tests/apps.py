"""Small Apps that worker subprocesses run in the runtime's tests.

Behaviour is chosen by environment variables so one module serves every test:
  TEST_SLOW_S      seconds each `work` handler sleeps (default 0)
  TEST_FAIL        "always" → `work` raises a RuntimeError every time
  TEST_FAIL_TIMES  `work` fails with a TransientError on the first N attempts
  TEST_RETRY_AFTER_S  the retry-after those failures ask for (default 0.2)
Every handler run is counted in Redis (`runs:<stage>` hash, field = task id), so a test can
tell "handled exactly once" from "stored once but handled twice".
"""

from __future__ import annotations

import asyncio
import os

from redis.asyncio import Redis

from pipeline import (
    App,
    Complete,
    Forward,
    InvalidTask,
    Keys,
    Message,
    Outcome,
    Stage,
    TransientError,
)

_client: Redis | None = None


async def count_run(msg: Message) -> None:
    global _client
    if _client is None:
        _client = Redis.from_url(os.environ["REDIS_URL"])
    keys = Keys(os.environ.get("PIPELINE_PREFIX", "pipeline"))
    await _client.hincrby(keys.app_key(f"runs:{msg.stage}"), msg.task_id, 1)


async def ingest(msg: Message) -> Outcome:
    await count_run(msg)
    if "n" not in msg.fields:
        raise InvalidTask("missing field 'n'")
    return Forward("work", {"n": int(msg.fields["n"])})


async def work(msg: Message) -> Outcome:
    await count_run(msg)
    slow = float(os.environ.get("TEST_SLOW_S", "0"))
    if slow:
        await asyncio.sleep(slow)
    if os.environ.get("TEST_FAIL") == "always":
        raise RuntimeError(f"boom on attempt {msg.attempt}")
    if msg.attempt <= int(os.environ.get("TEST_FAIL_TIMES", "0")):
        retry_after = float(os.environ.get("TEST_RETRY_AFTER_S", "0.2"))
        raise TransientError(f"transient failure on attempt {msg.attempt}", retry_after)
    body = msg.body(dict)
    return Forward("finish", {"n": body["n"], "worker": os.getpid()})


async def finish(msg: Message) -> Outcome:
    await count_run(msg)
    body = msg.body(dict)
    return Complete(
        {"status": "completed", "output": str(body["n"] * 2), "worker": str(body["worker"])}
    )


app = App(
    [
        Stage("ingest", "tasks", ingest),
        Stage("work", "work", work),
        Stage("finish", "finish", finish),
    ]
)
