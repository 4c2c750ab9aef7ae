"""The shared rate limiter against a real Redis: reservations, settlement, learning from
headers, cool-downs, concurrency slots that are leases, several API keys.

Two `RateLimiter` objects on one prefix stand for two worker processes: all they share is
Redis. Waiting is checked with short timeouts rather than by sleeping out whole minutes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from pipeline.claude.ratelimit import ApiKey, RateLimiter, Ticket, key_id, limiter_state
from pipeline.claude.settings import ApiKeySettings, FamilyLimits, RateLimitSettings
from pipeline.claude.task import Usage
from pipeline.runtime.keys import Keys
from pipeline.runtime.redis_conn import Availability
from tests.cli.conftest import cli_env
from tests.cli.test_cli import cli

pytestmark = pytest.mark.anyio


@pytest.fixture
async def make_limiter(aredis: Redis, prefix: str, redis_url: str) -> AsyncIterator[Any]:
    made: list[RateLimiter] = []

    def make(
        keys: list[ApiKeySettings] | None = None,
        secrets: list[str] | None = None,
        **settings: Any,
    ) -> RateLimiter:
        keys = keys or [ApiKeySettings(name="default")]
        secrets = secrets or [f"sk-{prefix}-{i}" for i in range(len(keys))]
        rl = RateLimitSettings(keys=keys, **settings)
        api_keys = [ApiKey(k, s) for k, s in zip(keys, secrets, strict=True)]
        limiter = RateLimiter(aredis, Keys(prefix), rl, api_keys, Availability(redis_url))
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.aclose()


def limits(**family: FamilyLimits) -> dict[str, FamilyLimits]:
    return family


async def admitted(limiter: RateLimiter, *args: int, within: float = 0.3) -> Ticket | None:
    """The ticket if `acquire` admits within `within` seconds, else None."""
    try:
        return await asyncio.wait_for(limiter.acquire("sonnet", *args), within)
    except TimeoutError:
        return None


async def test_requests_per_minute_hold_across_two_workers(make_limiter: Any) -> None:
    config = limits(sonnet=FamilyLimits(rpm=4, itpm=10**6, otpm=10**6))
    a, b = make_limiter(limits=config), make_limiter(limits=config)
    got = [await admitted(w, 10, 10) for w in (a, b, a, b)]
    assert all(got)
    assert await admitted(a, 10, 10) is None  # the 5th waits ~15 s for a refill
    assert await admitted(b, 10, 10) is None


async def test_output_is_reserved_at_max_tokens_and_refunded_on_settle(make_limiter: Any) -> None:
    a = make_limiter(limits=limits(sonnet=FamilyLimits(rpm=1000, itpm=10**6, otpm=1000)))
    first = await admitted(a, 10, 600)
    assert first is not None
    assert await admitted(a, 10, 600) is None  # 400 left: 600 does not fit
    await a.settle(first, usage=Usage(input_tokens=10, output_tokens=100), status=200)
    second = await admitted(a, 10, 600)  # 500 refunded: 900 left
    assert second is not None


async def test_a_failed_call_is_refunded_in_full(make_limiter: Any) -> None:
    a = make_limiter(limits=limits(sonnet=FamilyLimits(rpm=1000, itpm=1000, otpm=1000)))
    ticket = await admitted(a, 900, 900)
    assert ticket is not None
    await a.settle(ticket, usage=None, status=529)
    assert await admitted(a, 900, 900) is not None


async def test_a_429_cools_the_family_down_for_every_worker(
    make_limiter: Any, aredis: Redis, prefix: str
) -> None:
    config = limits(sonnet=FamilyLimits(rpm=1000, itpm=10**6, otpm=10**6))
    a, b = make_limiter(limits=config), make_limiter(limits=config)
    ticket = await admitted(a, 10, 10)
    assert ticket is not None
    await a.settle(ticket, usage=None, status=429, retry_after_s=1.5)
    started = time.monotonic()
    assert await admitted(b, 10, 10, within=1.0) is None  # the other worker waits too
    assert await admitted(b, 10, 10, within=2.0) is not None
    assert 1.3 < time.monotonic() - started < 3.0
    # Other families are not held back.
    assert await asyncio.wait_for(b.acquire("haiku", 10, 10), 0.3)
    state = await limiter_state(aredis, Keys(prefix))
    sonnet = next(s for s in state if s.family == "sonnet")
    assert sonnet.throttled_429 == 1


async def test_limits_are_learned_from_headers_and_remaining_corrects_drift(
    make_limiter: Any, aredis: Redis, prefix: str
) -> None:
    a = make_limiter()  # nothing configured: the first call probes alone
    probe = await admitted(a, 10, 10)
    assert probe is not None and probe.probing
    assert await admitted(a, 10, 10) is None  # one probe at a time
    headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "2",  # someone else spent the key
        "anthropic-ratelimit-input-tokens-limit": "20000",
        "anthropic-ratelimit-input-tokens-remaining": "19000",
        "anthropic-ratelimit-output-tokens-limit": "4000",
        "anthropic-ratelimit-output-tokens-remaining": "3990",
    }
    usage = Usage(input_tokens=10, output_tokens=10)
    await a.settle(probe, usage=usage, status=200, headers=headers)
    (state,) = await limiter_state(aredis, Keys(prefix))
    assert (state.rpm, state.itpm, state.otpm) == (50, 20000, 4000)
    assert state.learned
    assert 2 <= state.requests_left < 3
    assert await admitted(a, 10, 10) is not None
    assert await admitted(a, 10, 10) is not None
    assert await admitted(a, 10, 10) is None  # drift: only 2 were left


async def test_a_fake_without_limits_is_learned_as_unlimited(make_limiter: Any) -> None:
    a = make_limiter()
    probe = await admitted(a, 10, 10)
    assert probe is not None
    await a.settle(probe, usage=Usage(input_tokens=1), status=200, headers={})
    tickets = await asyncio.gather(*(a.acquire("sonnet", 10**6, 10**6) for _ in range(50)))
    assert not any(t.probing for t in tickets)


async def test_concurrency_slots_are_leases_a_dead_worker_gives_back(
    make_limiter: Any, aredis: Redis, prefix: str
) -> None:
    key = ApiKeySettings(name="default", max_concurrency=2)
    config: dict[str, Any] = {
        "limits": limits(sonnet=FamilyLimits(rpm=1000, itpm=10**6, otpm=10**6)),
        "slot_lease_ms": 1500,
    }
    dead = make_limiter(keys=[key], secrets=["sk-shared"], **config)
    live = make_limiter(keys=[key], secrets=["sk-shared"], **config)
    assert await admitted(dead, 10, 10) and await admitted(dead, 10, 10)
    await dead.aclose()  # its renewals stop, as if SIGKILLed: the slots are never settled
    assert await admitted(live, 10, 10, within=0.3) is None
    started = time.monotonic()
    assert await admitted(live, 10, 10, within=5.0) is not None
    assert time.monotonic() - started < 4.0  # the 1.5 s lease, plus a loaded machine


async def test_a_live_worker_keeps_its_slots_past_the_lease(make_limiter: Any) -> None:
    key = ApiKeySettings(name="default", max_concurrency=1)
    config: dict[str, Any] = {
        "limits": limits(sonnet=FamilyLimits(rpm=1000, itpm=10**6, otpm=10**6)),
        "slot_lease_ms": 600,
    }
    holder = make_limiter(keys=[key], secrets=["sk-shared"], **config)
    other = make_limiter(keys=[key], secrets=["sk-shared"], **config)
    ticket = await admitted(holder, 10, 10)
    assert ticket is not None
    assert await admitted(other, 10, 10, within=1.5) is None  # renewed, not expired
    await holder.settle(ticket, usage=Usage(), status=200)
    assert await admitted(other, 10, 10, within=0.5) is not None


async def test_load_spreads_over_several_keys_each_with_its_own_limits(
    make_limiter: Any, aredis: Redis, prefix: str
) -> None:
    keys = [
        ApiKeySettings(name="a", limits={"sonnet": FamilyLimits(rpm=3)}),
        ApiKeySettings(name="b", limits={"sonnet": FamilyLimits(rpm=5)}),
    ]
    shared = limits(sonnet=FamilyLimits(itpm=10**6, otpm=10**6))
    a = make_limiter(keys=keys, limits=shared)
    tickets = [await admitted(a, 10, 10) for _ in range(8)]
    assert all(tickets)
    used = [t.key.name for t in tickets if t is not None]
    assert used.count("a") == 3 and used.count("b") == 5
    assert used[:4] == ["a", "b", "a", "b"]  # round robin while both have room
    assert await admitted(a, 10, 10) is None


async def test_status_shows_limits_use_and_cool_downs_per_key_and_family(
    make_limiter: Any, redis_url: str, prefix: str
) -> None:
    a = make_limiter(secrets=["sk-status"])
    probe = await admitted(a, 10, 10)
    assert probe is not None
    headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "40",
        "anthropic-ratelimit-output-tokens-limit": "8000",
        "anthropic-ratelimit-output-tokens-remaining": "7000",
    }
    await a.settle(probe, usage=None, status=429, headers=headers, retry_after_s=30)
    env = {**cli_env(redis_url, prefix), "ANTHROPIC_API_KEY": "sk-status"}
    proc = cli(env, "status")
    assert proc.returncode == 0, proc.stderr
    row = next(ln.split() for ln in proc.stdout.splitlines() if ln.startswith(key_id("sk-status")))
    # key, family, requests, input, output, in flight, 429s, cool-down (admitted: in --json)
    assert row[1] == "sonnet"
    assert row[2].endswith("/50") and 39 <= int(row[2].split("/")[0]) <= 48  # refilling
    assert row[3] == "unlimited"  # the API stated no input-token limit
    assert row[4].endswith("/8,000")
    assert row[5:7] == ["0", "1"]
    assert row[7].endswith("s")  # cooling down
    data = json.loads(cli(env, "status", "--json").stdout)
    (limit,) = data["limits"]
    assert limit["rpm"] == 50 and limit["throttled_429"] == 1 and 0 < limit["cool_down_s"] <= 30
    assert limit["admitted"] == 1
