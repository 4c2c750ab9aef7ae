"""Retry policy: capped exponential backoff with equal jitter, retry-after as a floor."""

from __future__ import annotations

import itertools
import random

import pytest

from pipeline.claude.settings import RetrySettings
from pipeline.runtime.retry import GIVE_UP, GiveUp, RetryPolicy, compute_backoff

BASE, CAP = 1000, 300_000


def policy(seed: int = 1, max_attempts: int = 6) -> RetryPolicy:
    return RetryPolicy(max_attempts, BASE, CAP, random.Random(seed))


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8])
def test_backoff_between_half_and_full_exponential(attempt: int) -> None:
    rng = random.Random(attempt)
    ceiling = BASE * 2 ** (attempt - 1)
    delays = [compute_backoff(attempt, BASE, CAP, rng) for _ in range(500)]
    assert all(ceiling // 2 <= d <= ceiling for d in delays)
    # Both halves of the range are used: this is the jittered half, not a constant.
    assert min(delays) < ceiling * 0.6
    assert max(delays) > ceiling * 0.9


def test_backoff_grows_exponentially() -> None:
    rng = random.Random(0)
    lows = [min(compute_backoff(a, BASE, CAP, rng) for _ in range(50)) for a in range(1, 6)]
    assert all(later >= 2 * earlier * 0.9 for earlier, later in itertools.pairwise(lows))


def test_attempt_zero_is_treated_as_first() -> None:
    rng = random.Random(0)
    assert all(BASE // 2 <= compute_backoff(0, BASE, CAP, rng) <= BASE for _ in range(100))


@pytest.mark.parametrize("attempt", [10, 11, 20, 60])
def test_backoff_cap_respected(attempt: int) -> None:
    rng = random.Random(attempt)
    delays = [compute_backoff(attempt, BASE, CAP, rng) for _ in range(300)]
    assert all(CAP // 2 <= d <= CAP for d in delays)


def test_jitter_varies() -> None:
    rng = random.Random(7)
    delays = [compute_backoff(4, BASE, CAP, rng) for _ in range(200)]
    assert len(set(delays)) > 100


def test_next_delay_gives_up_at_max_attempts() -> None:
    p = policy(max_attempts=4)
    for attempt in (1, 2, 3):
        delay = p.next_delay(attempt)
        assert isinstance(delay, int)
        assert BASE * 2 ** (attempt - 1) // 2 <= delay <= BASE * 2 ** (attempt - 1)
    assert p.next_delay(4) is GIVE_UP
    assert p.next_delay(5) is GIVE_UP
    assert p.next_delay(4, hint_ms=1000) is GIVE_UP  # a hint does not buy extra attempts
    assert isinstance(GIVE_UP, GiveUp)
    assert repr(GIVE_UP) == "GIVE_UP"


def test_retry_after_hint_is_a_floor_with_at_most_ten_percent_spread() -> None:
    p = policy()
    hint = 30_000  # far above the attempt-1 backoff (<= 1 s)
    delays = [p.next_delay(1, hint_ms=hint) for _ in range(300)]
    assert all(isinstance(d, int) and hint <= d <= hint * 1.1 for d in delays)
    assert len(set(delays)) > 50  # spread, so workers that saw the same hint do not stampede


def test_zero_or_negative_hint_falls_back_to_the_backoff() -> None:
    p = policy()
    for hint in (0, -5):
        delays = [p.next_delay(1, hint_ms=hint) for _ in range(50)]
        assert all(isinstance(d, int) and d >= 0 for d in delays)
        assert all(d >= p.base_ms // 2 for d in delays)  # type: ignore[operator]


def test_backoff_wins_over_a_short_hint_on_late_attempts() -> None:
    p = RetryPolicy(max_attempts=10, base_ms=1000, max_ms=600_000, rng=random.Random(1))
    # attempt 6: backoff is 16-32 s; a 1 s retry-after must not make it hammer the server
    assert all(p.next_delay(6, hint_ms=1000) >= 16_000 for _ in range(50))  # type: ignore[operator]


def test_seeded_policies_are_deterministic() -> None:
    settings = RetrySettings(max_attempts=10, base_ms=100, max_ms=10_000)
    a = RetryPolicy.from_settings(settings, seed=42)
    b = RetryPolicy.from_settings(settings, seed=42)
    c = RetryPolicy.from_settings(settings, seed=43)
    seq_a = [a.next_delay(n) for n in range(1, 10)] + [a.next_delay(1, 5000)]
    seq_b = [b.next_delay(n) for n in range(1, 10)] + [b.next_delay(1, 5000)]
    seq_c = [c.next_delay(n) for n in range(1, 10)] + [c.next_delay(1, 5000)]
    assert seq_a == seq_b
    assert seq_a != seq_c
    assert a.next_delay(10) is GIVE_UP


def test_from_settings_uses_the_settings() -> None:
    p = RetryPolicy.from_settings(RetrySettings(max_attempts=2, base_ms=10, max_ms=15), seed=0)
    assert (p.max_attempts, p.base_ms, p.max_ms) == (2, 10, 15)
    assert all(5 <= p.next_delay(1) <= 10 for _ in range(50))  # type: ignore[operator]
    assert p.next_delay(2) is GIVE_UP
