"""A runner never asks Redis for a negative number of entries."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline import App, Complete, Keys, Message, Outcome, Stage, load_settings
from pipeline.runtime.context import WorkerContext
from pipeline.runtime.inflight import Inflight
from pipeline.runtime.leases import reclaim
from pipeline.runtime.redis_conn import Availability
from pipeline.runtime.retry import RetryPolicy
from pipeline.runtime.runner import StageRunner
from pipeline.runtime.scripts import Scripts

pytestmark = pytest.mark.anyio


async def handle(msg: Message) -> Outcome:
    return Complete()


async def test_a_reclaim_with_more_in_flight_than_slots_claims_nothing_and_does_not_fail(
    aredis: Any, redis_url: str, prefix: str
) -> None:
    """A read and a reclaim in flight together may leave a runner holding more entries than
    its concurrency; the next reclaim used to send XAUTOCLAIM a negative COUNT, which Redis
    refused, and the worker stopped."""
    settings = load_settings(env={"REDIS_URL": redis_url, "PIPELINE_PREFIX": prefix})
    stage = Stage("s", "s", handler=handle)
    ctx = WorkerContext(
        app=App([stage]), settings=settings, redis=aredis, scripts=Scripts.register(aredis),
        keys=Keys(prefix), consumer="c1", available=Availability(redis_url),
        retry_policy=RetryPolicy.from_settings(settings.retry),
    )  # fmt: skip
    runner = StageRunner(stage, None, ctx, 2, handle)
    await runner.ensure_group()
    for i in range(3):
        runner.inflight[f"{i}-0"] = Inflight(f"{i}-0", 1, 0.0)
    assert runner.free_slots() == 0
    assert await reclaim(runner) == 0
