"""What every loop of a worker process shares: the client, scripts, settings and state."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from redis.asyncio import Redis

from pipeline.runtime.hooks import Hooks
from pipeline.runtime.keys import Keys
from pipeline.runtime.redis_conn import Availability
from pipeline.runtime.replication import Replication
from pipeline.runtime.retry import RetryPolicy
from pipeline.runtime.scripts import Scripts
from pipeline.runtime.settings import BaseSettings
from pipeline.runtime.stage import App

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    app: App
    settings: BaseSettings
    redis: Redis
    scripts: Scripts
    keys: Keys
    consumer: str
    available: Availability
    retry_policy: RetryPolicy
    hooks: Hooks = field(default_factory=Hooks)
    #: `redis.durability = "replicated"`: what waits for replicas after writes (None: nothing).
    replication: Replication | None = None
    has_xackdel: bool = False
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    forced: bool = False  # a second signal: skip the rest of the grace period
    _logged: dict[str, float] = field(default_factory=dict)
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    def log_once(self, key: str, what: str, exc: BaseException, every_s: float = 60.0) -> None:
        """Log a repeating error once a minute, not once per entry."""
        now = time.monotonic()
        if now - self._logged.get(key, -every_s) >= every_s:
            self._logged[key] = now
            log.warning(
                "%s: %s: %r (repeats are silenced for %.0fs)", key, what, exc, every_s, exc_info=exc
            )

    def spawn_hook(self, name: str, *args: object) -> None:
        task = asyncio.create_task(self.hooks.emit(name, *args))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def mark_paused(self, stage: str, pause_s: float, reason: str) -> None:
        """Record the pause in Redis so `pipeline status` shows it to operators."""

        async def write() -> None:
            try:
                await self.redis.set(self.keys.pause(stage), reason[:500], px=int(pause_s * 1000))
            except Exception as exc:  # status only: never let it hurt the worker
                log.debug("could not record pause: %r", exc)

        task = asyncio.create_task(write())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
