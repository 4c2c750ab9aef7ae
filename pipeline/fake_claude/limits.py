"""Anthropic-style rate limits: continuous token buckets per (API key, model family).

Each limit is a bucket holding up to `limit` units that refills at `limit / 60` units a second,
without steps, so a client that waits `retry-after` seconds always finds the room it was told.
Output tokens are charged at `max_tokens` on admission and the unused part is given back when
the reply is produced, as Anthropic does. A cost above a bucket's capacity is admitted when the
bucket is full and leaves it in debt, so an oversized request is slow rather than impossible.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .config import FakeClaudeConfig, RateLimits

Clock = Callable[[], float]

_KINDS = (
    ("requests", "rpm", "requests"),
    ("input", "itpm", "input tokens"),
    ("output", "otpm", "output tokens"),
)


def model_family(model: str) -> str:
    """'haiku', 'sonnet' or 'opus' when the model id names one, else the model id itself."""
    lowered = model.lower()
    for family in ("haiku", "sonnet", "opus"):
        if family in lowered:
            return family
    return model


class TokenBucket:
    """A continuously refilled bucket of `capacity` units per minute."""

    __slots__ = ("capacity", "level", "rate", "updated")

    def __init__(self, capacity: float, now: float) -> None:
        self.capacity = float(capacity)
        self.rate = self.capacity / 60.0
        self.level = self.capacity
        self.updated = now

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_for(self, cost: float, now: float) -> float:
        """Seconds until `cost` fits; 0.0 when it fits now."""
        self.refill(now)
        need = min(cost, self.capacity)
        if self.level >= need:
            return 0.0
        return (need - self.level) / self.rate

    def take(self, cost: float, now: float) -> None:
        self.refill(now)
        self.level -= cost

    def give(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level = min(self.capacity, self.level + amount)

    def resize(self, capacity: float, now: float) -> None:
        """Apply a new limit at runtime, keeping what is used (never more than the new size)."""
        self.refill(now)
        self.capacity = float(capacity)
        self.rate = self.capacity / 60.0
        self.level = min(self.level, self.capacity)

    @property
    def remaining(self) -> int:
        return max(0, math.floor(self.level + 1e-9))

    @property
    def seconds_to_full(self) -> float:
        return max(0.0, (self.capacity - self.level) / self.rate)


@dataclass(slots=True)
class Admission:
    """The outcome of `RateLimiter.admit`: admitted and charged, or refused with a wait."""

    ok: bool
    headers: dict[str, str]
    retry_after_s: float = 0.0
    message: str = ""


@dataclass(slots=True)
class _Buckets:
    requests: TokenBucket | None = None
    input: TokenBucket | None = None
    output: TokenBucket | None = None
    limits: RateLimits = field(default_factory=RateLimits)


def rfc3339(epoch_s: float) -> str:
    """Whole seconds, rounded up so a reset time is never in the past."""
    return datetime.fromtimestamp(math.ceil(epoch_s), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RateLimiter:
    """All buckets of one server; `clock` is monotonic seconds, `wall` is epoch seconds."""

    def __init__(
        self, config: FakeClaudeConfig, clock: Clock = time.monotonic, wall: Clock = time.time
    ) -> None:
        self._config = config
        self._clock = clock
        self._wall = wall
        self._buckets: dict[tuple[str, str], _Buckets] = {}

    def configure(self, config: FakeClaudeConfig) -> None:
        """Swap in new limits; existing buckets keep their level (clamped to the new size)."""
        self._config = config
        now = self._clock()
        for (_, family), buckets in self._buckets.items():
            self._apply(buckets, config.limits_for(family), now)

    def clear(self) -> None:
        """Forget all usage: every bucket starts full again."""
        self._buckets.clear()

    def _get(self, api_key: str, family: str) -> _Buckets:
        buckets = self._buckets.get((api_key, family))
        if buckets is None:
            buckets = _Buckets()
            self._apply(buckets, self._config.limits_for(family), self._clock())
            self._buckets[(api_key, family)] = buckets
        return buckets

    @staticmethod
    def _apply(buckets: _Buckets, limits: RateLimits, now: float) -> None:
        buckets.limits = limits
        for attr, limit_name, _ in _KINDS:
            limit = getattr(limits, limit_name)
            bucket: TokenBucket | None = getattr(buckets, attr)
            if limit is None:
                setattr(buckets, attr, None)
            elif bucket is None:
                setattr(buckets, attr, TokenBucket(limit, now))
            elif bucket.capacity != limit:
                bucket.resize(limit, now)

    def admit(self, api_key: str, family: str, input_tokens: int, max_tokens: int) -> Admission:
        """Charge one request, its input tokens and `max_tokens` output tokens, or refuse all."""
        buckets = self._get(api_key, family)
        now = self._clock()
        costs = (1, input_tokens, max_tokens)
        wait, blocker = 0.0, ""
        for (attr, _, unit), cost in zip(_KINDS, costs, strict=True):
            bucket: TokenBucket | None = getattr(buckets, attr)
            if bucket is None:
                continue
            needed = bucket.wait_for(cost, now)
            if needed > wait:
                wait, blocker = needed, f"{int(bucket.capacity)} {unit} per minute"
        if wait > 0.0:
            retry_after = max(1, math.ceil(wait))
            message = (
                f"This request would exceed your rate limit of {blocker} for {family} models "
                f"(fake-claude). Retry after {retry_after} s."
            )
            return Admission(False, self._headers(buckets, now), wait, message)
        for (attr, _, _), cost in zip(_KINDS, costs, strict=True):
            bucket = getattr(buckets, attr)
            if bucket is not None:
                bucket.take(cost, now)
        return Admission(True, self._headers(buckets, now))

    def settle(
        self, api_key: str, family: str, max_tokens: int, output_tokens: int
    ) -> dict[str, str]:
        """Give back the output tokens reserved but not produced; returns the fresh headers."""
        buckets = self._get(api_key, family)
        now = self._clock()
        if buckets.output is not None and max_tokens > output_tokens:
            buckets.output.give(max_tokens - output_tokens, now)
        return self._headers(buckets, now)

    def headers(self, api_key: str, family: str) -> dict[str, str]:
        """The `anthropic-ratelimit-*` headers for the current state of one pair."""
        buckets = self._get(api_key, family)
        return self._headers(buckets, self._clock())

    def _headers(self, buckets: _Buckets, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        wall = self._wall()
        tightest: TokenBucket | None = None
        for attr, _, _ in _KINDS:
            bucket: TokenBucket | None = getattr(buckets, attr)
            if bucket is None:
                continue
            bucket.refill(now)
            name = "requests" if attr == "requests" else f"{attr}-tokens"
            _put(headers, name, bucket, wall)
            if attr != "requests" and (
                tightest is None
                or bucket.level / bucket.capacity < tightest.level / tightest.capacity
            ):
                tightest = bucket
        if tightest is not None:
            _put(headers, "tokens", tightest, wall)
        return headers


def _put(headers: dict[str, str], name: str, bucket: TokenBucket, wall: float) -> None:
    prefix = f"anthropic-ratelimit-{name}"
    headers[f"{prefix}-limit"] = str(int(bucket.capacity))
    headers[f"{prefix}-remaining"] = str(bucket.remaining)
    headers[f"{prefix}-reset"] = rfc3339(wall + bucket.seconds_to_full)
