"""The exact response cache: answers by canonical request hash, with hit/miss counters."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from pipeline.claude.settings import Settings
from pipeline.claude.task import Request
from pipeline.runtime.keys import Keys
from pipeline.runtime.redis_conn import Availability
from pipeline.runtime.services import Services

__all__ = ["ResponseCache", "looks_up"]


#: The lookup and its hit/miss count in one round trip.
_CACHE_GET = """
local value = redis.call('GET', KEYS[1])
redis.call('HINCRBY', KEYS[2], value and 'cache_hits' or 'cache_misses', 1)
return value
"""


class ResponseCache:
    """Exact response cache by canonical request hash, with hit/miss counters."""

    def __init__(self, redis: Redis, keys: Keys, available: Availability) -> None:
        self._redis = redis
        self._keys = keys
        self._available = available
        self._get = redis.register_script(_CACHE_GET)

    @classmethod
    def for_services(cls, services: Services[Any]) -> ResponseCache:
        """The worker's cache (`services.shared(ResponseCache.for_services)`)."""
        return cls(services.redis, services.keys, services.available)

    async def get(self, request_hash: str) -> bytes | None:
        """The cached answer, if any; counts a hit or a miss in `Keys.counters`. Waits out
        a Redis outage (a failure would only retry the task, but nothing gains by it)."""
        keys = [self._keys.cache(request_hash), self._keys.counters]
        if not self._keys.partitions:
            return _as_bytes(await self._available.call(lambda: self._get(keys=keys)))
        # Partitioned (a Cluster): the entry and the counters lie in two slots, so the count
        # follows the read (a counter is a statistic: a crash between loses one count).
        value = _as_bytes(await self._available.call(lambda: self._redis.get(keys[0])))
        name = "cache_hits" if value is not None else "cache_misses"
        await self._available.call(lambda: self._redis.hincrby(keys[1], name, 1))
        return value

    async def put(self, request_hash: str, value: bytes, ttl_s: int) -> None:
        """Cache `value` for `ttl_s` seconds; 0 (a task type not cached) stores nothing."""
        if ttl_s > 0:
            await self._redis.set(self._keys.cache(request_hash), value, ex=ttl_s)


def _as_bytes(value: bytes | str | None) -> bytes | None:
    """A GET reply. Connections never decode replies, so a str would be a misconfiguration;
    it fails as `bytes(str)` always did here."""
    if value is None or isinstance(value, bytes):
        return value
    raise TypeError(f"expected bytes from Redis, got {type(value).__name__}")


def looks_up(settings: Settings, request: object) -> bool:
    """Whether cache-check looks `request` up in the cache (a miss counts only then)."""
    return (
        isinstance(request, Request) and request.cache and settings.cache.ttl_for(request.type) > 0
    )
