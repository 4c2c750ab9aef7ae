"""What the runtime lends stage code: settings, the Redis client, the key layout, and one
place to keep what a worker's stages share (a domain's stores, built once per process).

Stages get a `Services` in their `build` function when a worker starts.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar, cast

from redis.asyncio import Redis

from pipeline.runtime.calls import CallReport, CallSink
from pipeline.runtime.held import HeldReport
from pipeline.runtime.keys import Keys
from pipeline.runtime.redis_conn import Availability
from pipeline.runtime.replication import Replication
from pipeline.runtime.settings import BaseSettings

__all__ = ["Services"]

S = TypeVar("S", bound=BaseSettings)
T = TypeVar("T")

log = logging.getLogger(__name__)


class Services(Generic[S]):
    """Shared by the stages of one worker process; closed when the worker stops.

    `settings` is the application's own settings type (a `BaseSettings`)."""

    def __init__(
        self,
        settings: S,
        redis: Redis,
        keys: Keys,
        available: Availability | None = None,
        hooks: CallSink | None = None,
        replication: Replication | None = None,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.redis = redis
        self.available = available or Availability(settings.redis.url)
        #: The worker's observation seam (its `Hooks`): a stage reports its model calls here.
        self.hooks: CallSink = hooks if hooks is not None else _NOBODY
        #: With `redis.durability = "replicated"`: wait for replicas after a write that
        #: stands for money spent (None: the primary's word is enough).
        self.replication = replication
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._shared: dict[object, Any] = {}

    def shared(self, make: Callable[[Services[S]], T]) -> T:
        """`make(self)`, built once per worker process and then shared by its stages (e.g. the
        ledger every stage charges through)."""
        if make not in self._shared:
            self._shared[make] = make(self)
        return cast(T, self._shared[make])

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Run `closer` when the worker stops (e.g. close an HTTP client)."""
        self._closers.append(closer)

    async def aclose(self) -> None:
        for closer in reversed(self._closers):
            try:
                await closer()
            except Exception:
                log.exception("closing a stage resource failed (ignored)")


class _Nobody:
    """No hooks: calls are not reported."""

    observing_calls = False

    def call(self, report: CallReport) -> None:
        return None

    def released(self, report: HeldReport) -> None:
        return None


_NOBODY = _Nobody()
