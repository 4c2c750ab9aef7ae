"""Connecting to Redis, and waiting out an outage instead of dying (guarantee 7)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import BusyLoadingError, ReadOnlyError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline.config import RedisSettings

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Errors that mean "Redis is not there right now", as opposed to a bad command.
UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    ReadOnlyError,
    ConnectionError,
    OSError,
)


def connect(settings: RedisSettings) -> Redis:
    """A client for `settings.url` (redis://, rediss://, unix://; user:password in the URL).

    The pool blocks when all `max_connections` are busy instead of failing: hundreds of
    handlers in one process share a few dozen connections.
    """
    pool = BlockingConnectionPool.from_url(
        settings.url,
        max_connections=settings.max_connections,
        timeout=settings.socket_timeout_s,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        health_check_interval=30,
        decode_responses=False,
    )
    return Redis.from_pool(pool)


async def server_version(redis: Redis) -> tuple[int, ...]:
    info = await redis.info("server")
    return tuple(int(p) for p in str(info["redis_version"]).split(".")[:3])


def redacted(url: str) -> str:
    """The URL with any password replaced, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{host}" if ":" in creds else f"{scheme}{sep}{user}@{host}"


class Availability:
    """Shared by every loop of a process: logs one line when Redis goes away and one when back."""

    def __init__(self, url: str, max_backoff_s: float = 5.0) -> None:
        self._url = redacted(url)
        self._down_since: float | None = None
        self._max_backoff_s = max_backoff_s

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def _mark_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("redis unavailable at %s (%s); waiting to reconnect", self._url, exc)

    def _mark_up(self) -> None:
        if self._down_since is not None:
            log.warning(
                "redis back at %s after %.1fs", self._url, time.monotonic() - self._down_since
            )
            self._down_since = None

    async def call(self, op: Callable[[], Awaitable[_T]]) -> _T:
        """Run `op` until it succeeds, backing off while Redis is unreachable.

        The first failure is retried at once without a word: after a restart, each pooled
        connection fails once as it is reused, and a fresh one then works.
        """
        delay, failures = 0.05, 0
        while True:
            try:
                result = await op()
            except (*UNAVAILABLE, RuntimeError) as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # redis-py may turn a cancellation that lands mid-command into a
                    # connection error; retrying it would swallow the cancel (a hang).
                    raise asyncio.CancelledError from exc
                if isinstance(exc, RuntimeError) and not _closed_transport(exc):
                    raise
                failures += 1
                if failures == 1 and not self.down:
                    continue
                self._mark_down(exc)
                await asyncio.sleep(delay)
                delay = min(self._max_backoff_s, delay * 2)
                continue
            self._mark_up()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A cancellation that landed mid-command, which redis-py swallowed and
                # finished the command instead: deliver it, or the task never stops.
                raise asyncio.CancelledError
            return result


def _closed_transport(exc: RuntimeError) -> bool:
    """uvloop reports a write on a connection the server just closed as a RuntimeError."""
    return "Transport closed" in str(exc)
