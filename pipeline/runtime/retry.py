"""Retry policy as a pure function of (attempt, hint): the runtime does the durable move."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipeline.runtime.settings import RetrySettings


class GiveUp:
    """Sentinel: attempts are exhausted."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "GIVE_UP"


GIVE_UP = GiveUp()


def compute_backoff(attempt: int, base_ms: int, max_ms: int, rng: random.Random) -> int:
    """Exponential backoff with "equal jitter": half fixed, half random, capped.

    Half of the delay is kept so that retries never collapse to zero; the random half spreads
    a burst of failures so they do not all come back at once.
    """
    # Annotated: `int ** int` is typed Any (a negative power would be a float).
    factor: int = 2 ** max(0, attempt - 1)
    ceiling = min(max_ms, base_ms * factor)
    half = ceiling // 2
    return half + rng.randint(0, ceiling - half)


@dataclass(frozen=True)
class RetryPolicy:
    """Decides how long to wait before the next attempt, or to give up."""

    max_attempts: int
    base_ms: int
    max_ms: int
    rng: random.Random

    @classmethod
    def from_settings(cls, settings: RetrySettings, seed: int | None = None) -> RetryPolicy:
        return cls(settings.max_attempts, settings.base_ms, settings.max_ms, random.Random(seed))

    def next_delay(self, attempt: int, hint_ms: int | None = None) -> int | GiveUp:
        """Delay before attempt `attempt + 1`; a hint (e.g. `retry-after`) sets the floor.

        A server's `retry-after` is honoured as a minimum, spread by up to 10% so that every
        worker that saw it does not come back in the same millisecond; the exponential
        backoff still applies when it is longer (a server that keeps failing is not hammered).
        """
        if attempt >= self.max_attempts:
            return GIVE_UP
        backoff = compute_backoff(attempt, self.base_ms, self.max_ms, self.rng)
        if hint_ms is None:
            return backoff
        hint_ms = max(hint_ms, 0)
        return max(backoff, hint_ms + self.rng.randint(0, max(1, hint_ms // 10)))
