"""The paid call itself: pick an API key, wait for rate-limit admission, call, settle.

claude-call's handler decides *whether* to call (memo, coalescing, budget); this module
owns *how*: the clients (one per configured API key), the distributed rate limiter and the
shared concurrency slots (guarantee 6).
"""

from __future__ import annotations

from pipeline.claude import call, make_client
from pipeline.config import Settings
from pipeline.services import Services
from pipeline.task import Answer, Routed


class Caller:
    """One per worker process; closed with the worker."""

    def __init__(self, services: Services, pool_size: int) -> None:
        settings: Settings = services.settings
        self._client = make_client(settings.claude, pool_size)
        self._pause_s = settings.claude.auth_pause_s

    async def call(self, routed: Routed) -> Answer:
        """One Claude call for `routed` (raises the pipeline's error tree, see claude.call)."""
        return await call(self._client, routed, auth_pause_s=self._pause_s)

    async def aclose(self) -> None:
        await self._client.close()
