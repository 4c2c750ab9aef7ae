"""A task cancelled while its Redis command is on the wire stops, every time.

redis-py (8.x) sometimes catches a cancellation that lands mid-command, finishes the command
and returns normally: a loop around it would then never stop (a worker's shutdown stalled
until its force-exit). `Availability.call` delivers such a swallowed cancellation.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from redis.asyncio import Redis

from pipeline.runtime.redis_conn import Availability

pytestmark = pytest.mark.anyio


async def test_a_cancelled_loop_of_redis_calls_always_stops(
    redis_url: str, anyio_backend: str
) -> None:
    redis = Redis.from_url(redis_url)
    available = Availability(redis_url)
    script = redis.register_script("return redis.call('TIME')")

    async def loop() -> None:
        while True:
            await available.call(lambda: script(keys=[], args=[]))
            await asyncio.sleep(0.0005)

    rng = random.Random(7)
    try:
        for attempt in range(300):
            task = asyncio.create_task(loop())
            await asyncio.sleep(rng.random() * 0.003)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=2)
            assert done, f"attempt {attempt}: the cancelled task kept running"
            assert task.cancelled()
    finally:
        await redis.aclose()
