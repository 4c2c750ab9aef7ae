"""Rate limits: bucket math on an injected clock, then 429s as the real SDK receives them."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import anthropic
import pytest

from pipeline.fake_claude import (
    FakeClaudeConfig,
    FakeClaudeServer,
    RateLimiter,
    RateLimits,
    TokenBucket,
    model_family,
)

SONNET = "claude-sonnet-5"
HAIKU = "claude-haiku-5-5"
OPUS = "claude-opus-5"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_refills_continuously() -> None:
    bucket = TokenBucket(60, now=0.0)  # 60 per minute = 1 per second
    assert bucket.wait_for(60, 0.0) == 0.0
    bucket.take(60, 0.0)
    assert bucket.remaining == 0
    assert bucket.wait_for(1, 0.0) == pytest.approx(1.0)
    assert bucket.wait_for(1, 0.25) == pytest.approx(0.75)  # no steps, no window edges
    assert bucket.wait_for(10, 0.25) == pytest.approx(9.75)
    bucket.refill(30.0)
    assert bucket.remaining == 30
    assert bucket.seconds_to_full == pytest.approx(30.0)
    bucket.refill(500.0)
    assert bucket.remaining == 60  # never above capacity
    assert bucket.seconds_to_full == 0.0


def test_oversized_cost_waits_for_a_full_bucket_then_leaves_debt() -> None:
    bucket = TokenBucket(100, now=0.0)
    bucket.take(50, 0.0)
    assert bucket.wait_for(250, 0.0) == pytest.approx(30.0)  # needs the full 100
    bucket.take(250, 30.0)
    assert bucket.level == pytest.approx(-150.0)
    assert bucket.wait_for(1, 30.0) == pytest.approx(151 * 0.6)


def test_limiter_rpm_refusal_and_retry_after() -> None:
    clock = FakeClock()
    limiter = RateLimiter(FakeClaudeConfig(rpm=2), clock=clock, wall=lambda: 0.0)
    assert limiter.admit("k", "sonnet", 10, 100).ok
    assert limiter.admit("k", "sonnet", 10, 100).ok
    refused = limiter.admit("k", "sonnet", 10, 100)
    assert not refused.ok
    assert refused.retry_after_s == pytest.approx(30.0)
    assert "2 requests per minute" in refused.message
    assert refused.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert refused.headers["anthropic-ratelimit-requests-reset"] == "1970-01-01T00:01:00Z"
    # Other keys and other families have their own buckets.
    assert limiter.admit("other", "sonnet", 10, 100).ok
    assert limiter.admit("k", "haiku", 10, 100).ok
    clock.now += 29.9
    assert not limiter.admit("k", "sonnet", 10, 100).ok
    clock.now += 0.1
    assert limiter.admit("k", "sonnet", 10, 100).ok


def test_limiter_charges_max_tokens_then_refunds_unused_output() -> None:
    clock = FakeClock()
    limiter = RateLimiter(FakeClaudeConfig(itpm=1000, otpm=1000), clock=clock)
    first = limiter.admit("k", "opus", 100, 800)
    assert first.ok
    assert first.headers["anthropic-ratelimit-output-tokens-remaining"] == "200"
    assert first.headers["anthropic-ratelimit-input-tokens-remaining"] == "900"
    assert not limiter.admit("k", "opus", 100, 800).ok  # 800 reserved up front
    after = limiter.settle("k", "opus", max_tokens=800, output_tokens=100)
    assert after["anthropic-ratelimit-output-tokens-remaining"] == "900"
    # tokens-* reports the most constrained of input and output.
    assert after["anthropic-ratelimit-tokens-remaining"] == "900"
    assert limiter.admit("k", "opus", 100, 800).ok


def test_refusal_charges_nothing() -> None:
    clock = FakeClock()
    limiter = RateLimiter(FakeClaudeConfig(rpm=10, itpm=100), clock=clock)
    assert limiter.admit("k", "haiku", 100, 10).ok
    refused = limiter.admit("k", "haiku", 50, 10)
    assert not refused.ok
    assert refused.headers["anthropic-ratelimit-requests-remaining"] == "9"


def test_limits_change_at_runtime_and_per_family() -> None:
    clock = FakeClock()
    config = FakeClaudeConfig(rpm=1, family_limits={"haiku": RateLimits(rpm=100)})
    limiter = RateLimiter(config, clock=clock)
    assert limiter.admit("k", "sonnet", 1, 1).ok
    assert not limiter.admit("k", "sonnet", 1, 1).ok
    for _ in range(100):
        assert limiter.admit("k", "haiku", 1, 1).ok
    limiter.configure(FakeClaudeConfig(rpm=None))
    assert limiter.admit("k", "sonnet", 1, 1).ok  # unlimited now
    assert limiter.headers("k", "sonnet") == {}
    limiter.configure(FakeClaudeConfig(rpm=120))
    headers = limiter.headers("k", "sonnet")
    assert headers["anthropic-ratelimit-requests-limit"] == "120"


def test_model_family() -> None:
    assert model_family("claude-haiku-5-5") == "haiku"
    assert model_family("claude-sonnet-4-5-20250929") == "sonnet"
    assert model_family("Claude-Opus-5") == "opus"
    assert model_family("claude-mythos-5") == "claude-mythos-5"


def _call(server: FakeClaudeServer, make_client: Any, n: int = 1, **params: Any) -> list[Any]:
    """`n` concurrent calls through the SDK; exceptions are returned, not raised."""
    body = {"model": SONNET, "max_tokens": 50, **params}

    async def scenario() -> list[Any]:
        async with make_client(server) as claude:
            calls = [
                claude.messages.with_raw_response.create(
                    messages=[{"role": "user", "content": f"request {i}"}], **body
                )
                for i in range(n)
            ]
            return list(await asyncio.gather(*calls, return_exceptions=True))

    return asyncio.run(scenario())


def _assert_ratelimit_headers(headers: Any, kinds: tuple[str, ...]) -> None:
    for kind in kinds:
        prefix = f"anthropic-ratelimit-{kind}"
        assert int(headers[f"{prefix}-limit"]) >= 1
        assert int(headers[f"{prefix}-remaining"]) >= 0
        reset = datetime.fromisoformat(headers[f"{prefix}-reset"])
        assert reset.tzinfo is not None
        assert abs(reset.timestamp() - time.time()) < 3600


def test_sdk_gets_429_with_retry_after_and_headers(start_fake: Any, make_client: Any) -> None:
    server = start_fake(rpm=3, itpm=10_000, otpm=10_000)
    ok = _call(server, make_client, n=3)
    for raw in ok:
        assert raw.http_response.status_code == 200
        _assert_ratelimit_headers(
            raw.headers, ("requests", "input-tokens", "output-tokens", "tokens")
        )
    assert ok[-1].headers["anthropic-ratelimit-requests-remaining"] == "0"

    [error] = _call(server, make_client)
    assert isinstance(error, anthropic.RateLimitError)
    assert error.status_code == 429 and error.type == "rate_limit_error"
    headers = error.response.headers
    assert 1 <= int(headers["retry-after"]) <= 20  # 3 rpm: one request every 20 s
    _assert_ratelimit_headers(headers, ("requests", "input-tokens", "output-tokens", "tokens"))
    assert server.stats()["by_status"] == {"200": 3, "429": 1}


def test_bucket_refills_in_real_time(start_fake: Any, make_client: Any) -> None:
    server = start_fake(rpm=60)  # one request a second
    results = _call(server, make_client, n=61)
    refused = [r for r in results if isinstance(r, anthropic.RateLimitError)]
    assert len(refused) == 1 and refused[0].response.headers["retry-after"] == "1"
    time.sleep(1.05)
    [again] = _call(server, make_client)
    assert again.http_response.status_code == 200


def test_otpm_counts_max_tokens_up_front(start_fake: Any, make_client: Any) -> None:
    server = start_fake(otpm=1000, max_output_tokens=20, min_output_tokens=20)
    [first] = _call(server, make_client, max_tokens=900)
    assert first.headers["anthropic-ratelimit-output-tokens-remaining"] == "980"  # refunded
    [refused] = _call(server, make_client, n=1, max_tokens=1000)
    assert isinstance(refused, anthropic.RateLimitError)
    assert "output tokens per minute" in (refused.api_message or "")


def test_runtime_limit_change_via_admin(start_fake: Any, make_client: Any) -> None:
    server = start_fake(rpm=1)
    _call(server, make_client)
    assert isinstance(_call(server, make_client)[0], anthropic.RateLimitError)
    server.update_config(rpm=None)
    assert _call(server, make_client)[0].http_response.status_code == 200
