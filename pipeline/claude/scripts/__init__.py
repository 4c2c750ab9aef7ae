"""The Claude domain's Lua scripts (paid calls, coalescing, ledger, budget, rate limits)."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from pipeline.runtime import scripts


def load(redis: Redis, name: str, *, after: str = "") -> AsyncScript:
    """One of this package's scripts registered on `redis` (`after`: shared functions first)."""
    return scripts.load(redis, name, after=after, package=__package__)
