"""What the runtime lends stage code: settings and small Redis-backed stores.

Stages never import redis or build keys; they get these objects from a `Services` handed
to their `build` function when a worker starts.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from pipeline.config import Settings
from pipeline.keys import Keys
from pipeline.ledger import Ledger
from pipeline.redis_conn import Availability

log = logging.getLogger(__name__)


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

    async def get(self, request_hash: str) -> bytes | None:
        """The cached answer, if any; counts a hit or a miss in `Keys.counters`. Waits out
        a Redis outage (a failure would only retry the task, but nothing gains by it)."""
        keys = [self._keys.cache(request_hash), self._keys.counters]
        return _as_bytes(await self._available.call(lambda: self._get(keys=keys)))

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


class Services:
    """Shared by the stages of one worker process; closed when the worker stops."""

    def __init__(
        self, settings: Settings, redis: Redis, keys: Keys, available: Availability | None = None
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.redis = redis
        self.available = available = available or Availability(settings.redis.url)
        self.cache = ResponseCache(redis, keys, available)
        self.ledger = Ledger(redis, keys, settings, available)
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Run `closer` when the worker stops (e.g. close an HTTP client)."""
        self._closers.append(closer)

    async def aclose(self) -> None:
        for closer in reversed(self._closers):
            try:
                await closer()
            except Exception:
                log.exception("closing a stage resource failed (ignored)")
