"""The paid call itself: pick an API key, wait for rate-limit admission, call, settle.

claude-call's handler decides *whether* to call (task record, budget, coalescing); this module
owns *how*: the clients (one per configured API key), the distributed rate limiter and the
shared concurrency slots (the "Rate limits hold" guarantee).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import anthropic

from pipeline.claude.api import call, make_client
from pipeline.claude.ratelimit import ApiKey, RateLimiter, Ticket
from pipeline.claude.settings import ClaudeSettings, Settings
from pipeline.claude.task import Answer, Routed, Usage
from pipeline.claude.tokens import estimate_input_tokens
from pipeline.runtime.calls import CallReport
from pipeline.runtime.errors import TransientError
from pipeline.runtime.services import Services

log = logging.getLogger(__name__)


async def _nothing() -> None:
    pass


class Caller:
    """One per worker process; closed with the worker."""

    def __init__(self, services: Services[Settings], pool_size: int) -> None:
        settings = services.settings
        self._pause_s = settings.claude.auth_pause_s
        self._claude = settings.claude
        api_keys = _api_keys(services)
        self._clients = {
            key.name: make_client(settings.claude, pool_size, api_key=key.secret)
            for key in api_keys
        }
        self._limiter: RateLimiter | None = None
        if settings.ratelimit.enabled:
            self._limiter = RateLimiter(
                services.redis, services.keys, settings.ratelimit, api_keys, services.available
            )
        self._api_keys = api_keys
        self._turn = 0
        self._hooks = services.hooks

    @property
    def limiter(self) -> RateLimiter | None:
        return self._limiter

    async def call(
        self, routed: Routed, before_send: Callable[[], Awaitable[None]] = _nothing
    ) -> Answer:
        """One Claude call for `routed` (raises the pipeline's error tree, see claude.call).

        `before_send` runs once the call is admitted, just before it goes out: from then on
        it is paid for and must not be thrown away. What it raises is raised here, and the
        call is not sent (its admission is handed back, charging nothing).
        """
        if self._limiter is None:
            self._turn = (self._turn + 1) % len(self._api_keys)
            client = self._clients[self._api_keys[self._turn].name]
            await before_send()
            observe = self._hooks.call if self._hooks.observing_calls else None
            return await call(
                client, routed, auth_pause_s=self._pause_s, on_report=observe,
                settings=self._claude,
            )  # fmt: skip
        ticket = await self._limiter.acquire(
            routed.family, estimate_input_tokens(routed.request), routed.max_tokens
        )
        try:
            await before_send()
        except BaseException:
            await self._settle(ticket, None, None)  # not sent: charge nothing, free the slot
            raise
        reports: list[CallReport] = []

        def on_report(report: CallReport) -> None:  # the limiter's, then the hooks'
            reports.append(report)
            self._hooks.call(report)

        try:
            answer = await call(
                self._clients[ticket.key.name], routed, auth_pause_s=self._pause_s,
                on_report=on_report, settings=self._claude,
            )  # fmt: skip
        except asyncio.CancelledError:
            # Cancelled after it was sent (a forced shutdown): the API may well have billed
            # it, so the reservation stays charged rather than be handed back as unused.
            used = Usage(input_tokens=ticket.input_tokens, output_tokens=ticket.output_tokens)
            await asyncio.shield(self._limiter.settle(ticket, usage=used, status=0))
            raise
        except BaseException as exc:
            # Failed: charge nothing, free the slot, and on a 429 make every worker pause
            # the family.
            retry_after = exc.retry_after_s if isinstance(exc, TransientError) else None
            report = reports[0] if reports else None
            await self._settle(ticket, report, retry_after)
            raise
        await self._settle(ticket, reports[0] if reports else None, None)
        return answer

    async def _settle(
        self, ticket: Ticket, report: CallReport | None, retry_after_s: float | None
    ) -> None:
        assert self._limiter is not None
        settle = self._limiter.settle(
            ticket,
            usage=report.usage if report else None,
            status=report.status if report else 0,
            headers=report.headers if report else None,
            retry_after_s=retry_after_s,
        )
        # A settle must survive the call's cancellation, or the slot would stay held
        # until its lease runs out.
        await asyncio.shield(settle)

    async def aclose(self) -> None:
        if self._limiter is not None:
            await self._limiter.aclose()
        for client in self._clients.values():
            await client.close()


def make_batch_client(settings: ClaudeSettings) -> anthropic.AsyncAnthropic:
    """The batch lane's client: a few calls at a time (create, poll, results), the key from
    `ANTHROPIC_API_KEY` (batches go out under the default key)."""
    return make_client(settings, concurrency=8)


def _api_keys(services: Services[Settings]) -> list[ApiKey]:
    """The configured keys whose secret is in the environment (a missing one is skipped,
    loudly). The default key may also be absent: the SDK then finds its own credentials or
    the call fails as an authentication error, pausing the stage."""
    configured = services.settings.ratelimit.api_keys()
    found = [ApiKey(key, os.environ.get(key.env)) for key in configured]
    present = [key for key in found if key.secret]
    for key in found:
        if not key.secret and len(configured) > 1:
            log.error(
                "API key %s: $%s is not set; calls use the other keys", key.name, key.settings.env
            )
    if present:
        return present
    # No secret anywhere: let the SDK resolve ANTHROPIC_AUTH_TOKEN etc. itself.
    return [found[0]]
