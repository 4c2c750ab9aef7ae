"""Injected 529/500 errors, streams failing halfway, latency: the SDK's error classes,
seeded reproducibility."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import anthropic
import httpx2
import pytest

from pipeline.fake_claude import FakeClaudeApp, FakeClaudeConfig, FakeClaudeServer
from pipeline.fake_claude.config import patched

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


# -- streams failing halfway -------------------------------------------------------------------

STREAM_BODY = {
    "model": SONNET,
    "max_tokens": 1024,
    "messages": [{"role": "user", "content": "Stream a long answer"}],
}


def _sdk_stream(server: FakeClaudeServer, make_client: Any) -> Any:
    async def call() -> Any:
        async with make_client(server) as claude, claude.messages.stream(**STREAM_BODY) as stream:
            return await stream.get_final_message()

    return asyncio.run(call())


def _raw_stream(server: FakeClaudeServer) -> tuple[str, Exception | None]:
    """The SSE text a raw client reads, and what ended the read (None: a clean end)."""

    async def read() -> tuple[str, Exception | None]:
        chunks: list[str] = []
        async with httpx2.AsyncClient() as http:
            try:
                async with http.stream(
                    "POST",
                    f"{server.base_url}/v1/messages",
                    json={**STREAM_BODY, "stream": True},
                    headers={"x-api-key": "k"},
                ) as response:
                    assert response.status_code == 200
                    async for text in response.aiter_text():
                        chunks.append(text)
            except httpx2.HTTPError as exc:
                return "".join(chunks), exc
        return "".join(chunks), None

    return asyncio.run(read())


def _assert_not_a_call(server: FakeClaudeServer) -> dict[str, Any]:
    stats = server.stats()
    assert stats["calls_by_request"] == {} and stats["calls"] == []
    assert stats["succeeded"] == 0 and stats["usage"]["output_tokens"] == 0
    return stats


def test_stream_error_event_mid_stream(start_fake: Any, make_client: Any) -> None:
    server = start_fake(stream_error_rate=1.0)
    with pytest.raises(anthropic.APIStatusError) as caught:
        _sdk_stream(server, make_client)
    error = caught.value
    # The HTTP status was 200, so the SDK cannot pick its 529 class: a plain APIStatusError.
    assert type(error) is anthropic.APIStatusError
    assert not isinstance(error, anthropic.OverloadedError)
    assert error.status_code == 200
    assert error.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }

    text, ended_by = _raw_stream(server)
    assert ended_by is None  # the response itself ends cleanly after the error event
    assert text.startswith("event: message_start\n")
    assert "event: content_block_delta\n" in text
    assert "message_stop" not in text and "message_delta" not in text
    assert text.endswith(
        "event: error\n"
        'data: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}'
        "\n\n"
    )
    stats = _assert_not_a_call(server)
    assert stats["streams_errored"] == 2 and stats["streams_cut"] == 0
    assert stats["by_status"] == {"200": 2}


def test_stream_cut_mid_stream(start_fake: Any, make_client: Any) -> None:
    server = start_fake(stream_cut_rate=1.0)
    # The SDK does not wrap what the transport raises while it reads a stream.
    with pytest.raises(httpx2.RemoteProtocolError):
        _sdk_stream(server, make_client)

    text, ended_by = _raw_stream(server)
    assert isinstance(ended_by, httpx2.RemoteProtocolError)
    assert text.startswith("event: message_start\n")
    assert "event: content_block_delta\n" in text
    assert "message_stop" not in text and "event: error" not in text
    stats = _assert_not_a_call(server)
    assert stats["streams_cut"] == 2 and stats["streams_errored"] == 0


def test_stream_faults_leave_plain_calls_alone(start_fake: Any, make_client: Any) -> None:
    server = start_fake(stream_error_rate=0.5, stream_cut_rate=0.5)
    assert _outcomes(server, make_client, 5) == [200] * 5
    stats = server.stats()
    assert stats["succeeded"] == 5 and stats["streams_errored"] == stats["streams_cut"] == 0


def _stream_outcomes(server: FakeClaudeServer, make_client: Any, n: int) -> list[str]:
    async def scenario() -> list[str]:
        outcomes = []
        async with make_client(server) as claude:
            for i in range(n):
                body = {**STREAM_BODY, "messages": [{"role": "user", "content": f"{i}"}]}
                try:
                    async with claude.messages.stream(**body) as stream:
                        await stream.get_final_message()
                    outcomes.append("ok")
                except anthropic.APIStatusError:
                    outcomes.append("error")
                except httpx2.RemoteProtocolError:
                    outcomes.append("cut")
        return outcomes

    return asyncio.run(scenario())


def test_stream_faults_are_seeded_and_set_at_runtime(start_fake: Any, make_client: Any) -> None:
    server = start_fake(seed=3)
    assert _stream_outcomes(server, make_client, 4) == ["ok"] * 4
    config = server.update_config(stream_error_rate=0.3, stream_cut_rate=0.3)
    assert (config.stream_error_rate, config.stream_cut_rate) == (0.3, 0.3)
    first = _stream_outcomes(server, make_client, 30)
    assert set(first) == {"ok", "error", "cut"}
    stats = server.stats()
    assert stats["streams_errored"] == first.count("error")
    assert stats["streams_cut"] == first.count("cut")
    assert stats["succeeded"] == 4 + first.count("ok")
    server.update_config(seed=4)
    server.update_config(seed=3)
    assert _stream_outcomes(server, make_client, 30) == first


@pytest.mark.parametrize(
    "patch",
    [
        {"stream_error_rate": 1.5},
        {"stream_cut_rate": -0.1},
        {"stream_error_rate": 0.6, "stream_cut_rate": 0.6},
        {"record_requests": -1},
    ],
)
def test_new_fault_and_recording_settings_are_validated(patch: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        patched(FakeClaudeConfig(), patch)
