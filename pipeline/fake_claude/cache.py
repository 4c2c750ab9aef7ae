"""Prompt caching as Anthropic bills it, keyed by (API key, prefix digest).

The longest breakpoint prefix still alive is read from the cache; the prefixes of the later
breakpoints are written; `input_tokens` is what follows the last breakpoint. A hit refreshes
the entry's lifetime. Planning is separate from committing so a request refused by the rate
limiter leaves the cache as it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .prompt import Breakpoint, ParsedRequest

_ONE_HOUR_S = 3600.0


@dataclass(slots=True)
class CachePlan:
    """Usage split of one request, and the entries to write if it is admitted."""

    input_tokens: int
    cache_read_input_tokens: int
    cache_creation_5m: int
    cache_creation_1h: int
    writes: list[tuple[tuple[str, bytes], float]]

    @property
    def cache_creation_input_tokens(self) -> int:
        return self.cache_creation_5m + self.cache_creation_1h

    @property
    def uncached_input_tokens(self) -> int:
        """What counts against ITPM: cache reads do not, as on current Anthropic models."""
        return self.input_tokens + self.cache_creation_input_tokens


class PromptCache:
    """Expiry times of cached prefixes; swept lazily so it never grows without bound."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._expiry: dict[tuple[str, bytes], float] = {}
        self._next_sweep = 1024

    def clear(self) -> None:
        self._expiry.clear()

    def __len__(self) -> int:
        return len(self._expiry)

    def plan(
        self, api_key: str, request: ParsedRequest, ttl_5m_s: float, min_tokens: int = 0
    ) -> CachePlan:
        """Split the request's input tokens into read / created / plain, changing nothing."""
        eligible: list[Breakpoint] = [b for b in request.breakpoints if b.tokens >= min_tokens]
        if not eligible:
            return CachePlan(request.input_tokens, 0, 0, 0, [])
        now = self._clock()
        hit = -1
        for i in range(len(eligible) - 1, -1, -1):
            if self._expiry.get((api_key, eligible[i].digest), 0.0) > now:
                hit = i
                break
        read = eligible[hit].tokens if hit >= 0 else 0
        created_5m = created_1h = 0
        covered = read
        for bp in eligible[hit + 1 :]:
            if bp.ttl == "1h":
                created_1h += bp.tokens - covered
            else:
                created_5m += bp.tokens - covered
            covered = bp.tokens
        writes = [
            ((api_key, bp.digest), now + (_ONE_HOUR_S if bp.ttl == "1h" else ttl_5m_s))
            for bp in eligible
        ]
        return CachePlan(request.input_tokens - covered, read, created_5m, created_1h, writes)

    def commit(self, plan: CachePlan) -> None:
        """Store (or refresh) the planned entries."""
        expiry = self._expiry
        for key, until in plan.writes:
            if expiry.get(key, 0.0) < until:
                expiry[key] = until
        if len(expiry) > self._next_sweep:
            now = self._clock()
            for key in [k for k, until in expiry.items() if until <= now]:
                del expiry[key]
            self._next_sweep = max(1024, 2 * len(expiry))
