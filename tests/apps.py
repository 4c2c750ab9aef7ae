"""Small Apps that worker subprocesses run in the runtime's tests.

Behaviour is chosen by environment variables so one module serves every test:
  TEST_SLOW_S      seconds each `work` handler sleeps (default 0)
  TEST_FAIL        "always" → `work` raises a RuntimeError every time
  TEST_FAIL_TIMES  `work` fails with a TransientError on the first N attempts
"""

from __future__ import annotations

import asyncio
import os

from pipeline import App, Complete, Forward, InvalidTask, Message, Outcome, Stage, TransientError


async def ingest(msg: Message) -> Outcome:
    if "n" not in msg.fields:
        raise InvalidTask("missing field 'n'")
    return Forward("work", {"n": int(msg.fields["n"])})


async def work(msg: Message) -> Outcome:
    slow = float(os.environ.get("TEST_SLOW_S", "0"))
    if slow:
        await asyncio.sleep(slow)
    if os.environ.get("TEST_FAIL") == "always":
        raise RuntimeError(f"boom on attempt {msg.attempt}")
    if msg.attempt <= int(os.environ.get("TEST_FAIL_TIMES", "0")):
        raise TransientError(f"transient failure on attempt {msg.attempt}", retry_after_s=0.2)
    body = msg.body(dict)
    return Forward("finish", {"n": body["n"], "worker": os.getpid()})


async def finish(msg: Message) -> Outcome:
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
