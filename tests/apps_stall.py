"""tests.apps's App, with a `work` stage whose process stalls between deciding and committing.

TEST_STALL_S: on an entry's first delivery, `work` returns its hand-off and then, before the
runtime can commit it, blocks the whole event loop, as a long GC pause, a SIGSTOP or a
starved host would: no lease renewal, no commit, nothing runs. The block is queued
(`call_soon`) while the handler runs, so it runs before anything the handler's return
queues. It lasts until another worker has run `work` for the same task (which it can only
do once the lease lapsed and it reclaimed the entry), at most TEST_STALL_S seconds; so the
stalled worker commits right after another worker took its entry over, whatever the load.
Later deliveries go through at once. `runs:<stage>` counts every handler run, as in
tests.apps.
"""

from __future__ import annotations

import asyncio
import os
import time

import redis

from pipeline import App, Keys, Message, Outcome, Stage
from tests import apps


def _stall(task_id: str, most_s: float) -> None:
    """Block this thread until `work` ran twice for the task (or `most_s` passed)."""
    runs = Keys(os.environ.get("PIPELINE_PREFIX", "pipeline")).app_key("runs:work")
    deadline = time.monotonic() + most_s
    with redis.Redis.from_url(os.environ["REDIS_URL"]) as client:
        while time.monotonic() < deadline and int(client.hget(runs, task_id) or 0) < 2:
            time.sleep(0.05)


async def work(msg: Message) -> Outcome:
    outcome = await apps.work(msg)
    most_s = float(os.environ.get("TEST_STALL_S", "0"))
    if most_s and msg.deliveries == 1:
        asyncio.get_running_loop().call_soon(_stall, msg.task_id, most_s)
    return outcome


app = App(
    [
        Stage("ingest", "tasks", apps.ingest),
        Stage("work", "work", work),
        Stage("finish", "finish", apps.finish),
    ]
)
