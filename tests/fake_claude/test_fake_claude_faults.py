"""Injected 529/500 errors and latency: the SDK's error classes, seeded reproducibility."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import anthropic
import pytest

from pipeline.fake_claude import FakeClaudeApp, FakeClaudeConfig, FakeClaudeServer

SONNET = "claude-sonnet-5"


def _outcomes(server: FakeClaudeServer, make_client: Any, n: int) -> list[int]:
    """Status of `n` sequential calls (sequential, so the seeded order is the call order)."""

    async def scenario() -> list[int]:
        statuses = []
        async with make_client(server) as claude:
            for i in range(n):
                try:
                    await claude.messages.create(
                        model=SONNET, max_tokens=20, messages=[{"role": "user", "content": f"{i}"}]
                    )
                    statuses.append(200)
                except anthropic.APIStatusError as exc:
                    statuses.append(exc.status_code)
        return statuses

    return asyncio.run(scenario())


def test_overloaded_is_529_overloaded_error(start_fake: Any, make_client: Any) -> None:
    server = start_fake(overloaded_rate=1.0)

    async def call() -> Any:
        async with make_client(server) as claude:
            return await claude.messages.create(
                model=SONNET, max_tokens=20, messages=[{"role": "user", "content": "x"}]
            )

    with pytest.raises(anthropic.InternalServerError) as caught:
        asyncio.run(call())
    error = caught.value
    assert isinstance(error, anthropic.OverloadedError)  # the SDK's class for 529
    assert error.status_code == 529
    assert error.type == "overloaded_error"
    assert error.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
        "request_id": error.request_id,
    }
    assert server.stats()["succeeded"] == 0


def test_server_error_is_500_api_error(start_fake: Any, make_client: Any) -> None:
    server = start_fake(server_error_rate=1.0)

    async def call() -> Any:
        async with make_client(server) as claude:
            return await claude.messages.create(
                model=SONNET, max_tokens=20, messages=[{"role": "user", "content": "x"}]
            )

    with pytest.raises(anthropic.InternalServerError) as caught:
        asyncio.run(call())
    assert caught.value.status_code == 500 and caught.value.type == "api_error"


def test_error_rates_are_reproducible_with_a_seed(start_fake: Any, make_client: Any) -> None:
    fields = {"overloaded_rate": 0.3, "server_error_rate": 0.2, "seed": 7}
    first = _outcomes(start_fake(**fields), make_client, 40)
    second = _outcomes(start_fake(**fields), make_client, 40)
    assert first == second
    assert {200, 500, 529} == set(first)
    other_seed = _outcomes(start_fake(**{**fields, "seed": 8}), make_client, 40)
    assert other_seed != first


def test_reseeding_at_runtime_restarts_the_sequence(start_fake: Any, make_client: Any) -> None:
    server = start_fake(overloaded_rate=0.5, seed=1)
    first = _outcomes(server, make_client, 20)
    server.update_config(seed=2)
    server.update_config(seed=1)
    assert _outcomes(server, make_client, 20) == first


def test_fixed_latency(start_fake: Any, make_client: Any) -> None:
    server = start_fake(latency_ms=300)
    started = time.perf_counter()
    assert _outcomes(server, make_client, 1) == [200]
    assert time.perf_counter() - started >= 0.3


def test_lognormal_latency_median_and_cap() -> None:
    app = FakeClaudeApp(FakeClaudeConfig(latency_ms=1000, latency_sigma=0.8, latency_cap_ms=3000))
    samples = [app.latency_s(app.config) for _ in range(5000)]
    assert statistics.median(samples) == pytest.approx(1.0, rel=0.1)
    assert max(samples) == 3.0
    assert min(samples) > 0
    fixed = FakeClaudeApp(FakeClaudeConfig(latency_ms=250))
    assert fixed.latency_s(fixed.config) == 0.25
