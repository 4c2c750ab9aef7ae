"""Connecting to Redis, and waiting out an outage instead of dying (guarantee 7)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import BusyLoadingError, ReadOnlyError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline.config import RedisSettings
from pipeline.redis_errors import TABLE, Action, Fault, RedisRefused, classify

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: For a one-shot command (the CLI, a producer): errors that mean "Redis is not there right
#: now", as opposed to a bad command. Loops wait out more (`pipeline.redis_errors`).
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
    """Shared by every loop of a process: waits out what `pipeline.redis_errors` says to wait
    out, with one log line when Redis goes away, one when the reason changes, one when back."""

    def __init__(self, url: str, max_backoff_s: float = 5.0) -> None:
        self._url = redacted(url)
        self._down_since: float | None = None
        self._down_code = ""
        self._max_backoff_s = max_backoff_s

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def _mark_down(self, fault: Fault, exc: BaseException) -> None:
        if fault.code == self._down_code:
            return
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "redis unavailable at %s: %s (%s); waiting", self._url, fault.meaning, _brief(exc)
            )
        else:
            log.warning("redis still unavailable at %s: now %s", self._url, fault.meaning)
        self._down_code = fault.code

    def _mark_up(self) -> None:
        if self._down_since is not None:
            log.warning(
                "redis back at %s after %.1fs", self._url, time.monotonic() - self._down_since
            )
            self._down_since = None
            self._down_code = ""

    async def call(
        self,
        op: Callable[[], Awaitable[_T]],
        recreate: Callable[[], Awaitable[None]] | None = None,
    ) -> _T:
        """Run `op` until it succeeds, waiting out what Redis will get over by itself.

        `recreate`: what to do when a stream or consumer group is gone (NOGROUP) before
        trying again; without it, NOGROUP is raised. Refused credentials raise
        `RedisRefused`; errors the table does not know are raised as they are.

        The first connection failure is retried at once without a word: after a restart,
        each pooled connection fails once as it is reused, and a fresh one then works.
        """
        delay, failures, recreated = 0.05, 0, 0
        while True:
            try:
                result = await op()
            except (RedisError, OSError, RuntimeError) as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # redis-py may turn a cancellation that lands mid-command into a
                    # connection error; retrying it would swallow the cancel (a hang).
                    raise asyncio.CancelledError from exc
                if isinstance(exc, RuntimeError) and not _closed_transport(exc):
                    raise
                fault = _CLOSED if isinstance(exc, RuntimeError) else classify(exc)
                if fault is None:
                    raise
                if fault.action is Action.STOP:
                    raise RedisRefused(f"redis at {self._url}: {fault.meaning} ({exc})") from None
                if fault.action is Action.RECREATE:
                    recreated += 1
                    if recreate is None or recreated > 3:  # it did not help: not ours to fix
                        raise
                    await recreate()
                    continue
                failures += 1
                if failures == 1 and not self.down and fault.code == "connection":
                    continue
                self._mark_down(fault, exc)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(self._max_backoff_s, delay * 2)
                continue
            self._mark_up()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A cancellation that landed mid-command, which redis-py swallowed and
                # finished the command instead: deliver it, or the task never stops.
                raise asyncio.CancelledError
            return result


def _brief(exc: BaseException) -> str:
    """The error's first line, short (a script error can quote a whole script)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _closed_transport(exc: RuntimeError) -> bool:
    """uvloop reports a write on a connection the server just closed as a RuntimeError."""
    return "Transport closed" in str(exc)


_CLOSED = next(fault for fault in TABLE if fault.code == "connection")
