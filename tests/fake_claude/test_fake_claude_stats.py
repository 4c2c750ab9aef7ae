"""Stats must be exact: pipeline tests use them to prove each task reached Claude once."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import anthropic

from pipeline.fake_claude import FakeClaudeServer, request_key

SONNET = "claude-sonnet-5"
HAIKU = "claude-haiku-5-5"


def _body(i: int) -> dict[str, Any]:
    return {
        "model": SONNET,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": f"task number {i}"}],
        "metadata": {"user_id": f"task-{i}"},
    }


async def _admin(server: FakeClaudeServer, method: str, path: str, body: Any = None) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"{server.base_url}{path}", json=body) as response,
    ):
        return response.status, await response.json()


def test_one_count_per_distinct_request(fake: FakeClaudeServer, make_client: Any) -> None:
    async def scenario() -> None:
        async with make_client(fake) as claude:
            await asyncio.gather(*(claude.messages.create(**_body(i)) for i in range(50)))
            await claude.messages.create(**_body(7))  # one task paid twice
            # Metadata is not part of the request key: same prompt, another tag.
            await claude.messages.create(**{**_body(8), "metadata": {"user_id": "retry-of-8"}})

    asyncio.run(scenario())
    stats = fake.stats()
    calls = stats["calls_by_request"]
    assert stats["succeeded"] == 52 and stats["distinct_requests"] == 50
    assert stats["duplicate_requests"] == 2 and stats["max_calls_per_request"] == 2
    assert calls[request_key(_body(7))] == 2
    assert calls[request_key(_body(8))] == 2
    assert calls[request_key(_body(9))] == 1
    assert stats["calls_by_user_id"]["task-7"] == 2
    assert stats["calls_by_user_id"]["task-8"] == 1
    assert stats["calls_by_user_id"]["retry-of-8"] == 1
    assert stats["by_status"] == {"200": 52}
    assert stats["requests_total"] == 52 and stats["inflight"] == 0
    assert 1 <= stats["inflight_max"] <= 50
    per_pair = stats["by_key_family"]["sk-test|sonnet"]
    assert per_pair["succeeded"] == 52
    assert per_pair["output_tokens"] == stats["usage"]["output_tokens"] > 0


def test_request_key_ignores_key_order_and_stream(fake: FakeClaudeServer) -> None:
    body = _body(1)
    shuffled = dict(reversed(list(body.items())))
    assert request_key(body) == request_key(shuffled) == request_key({**body, "stream": True})
    assert request_key(body) != request_key({**body, "max_tokens": 65})
    assert request_key(body) != request_key({**body, "system": "be brief"})


def test_failed_calls_are_not_counted_as_calls(start_fake: Any, make_client: Any) -> None:
    server = start_fake(rpm=1, bad_keys=frozenset({"sk-bad"}))

    async def scenario() -> None:
        async with make_client(server) as claude:
            await claude.messages.create(**_body(1))
            with contextlib.suppress(anthropic.RateLimitError):
                await claude.messages.create(**_body(2))
        async with make_client(server, api_key="sk-bad") as claude:
            with contextlib.suppress(anthropic.AuthenticationError):
                await claude.messages.create(**_body(3))

    asyncio.run(scenario())
    stats = server.stats()
    assert stats["calls_by_request"] == {request_key(_body(1)): 1}
    assert stats["calls_by_user_id"] == {"task-1": 1}
    assert stats["by_status"] == {"200": 1, "401": 1, "429": 1}
    assert stats["by_key_family"]["sk-test|sonnet"]["status_429"] == 1


def test_admin_endpoints(fake: FakeClaudeServer, make_client: Any) -> None:
    async def scenario() -> None:
        async with make_client(fake) as claude:
            await claude.messages.create(**_body(1))
        assert await _admin(fake, "GET", "/_fake/health") == (200, {"ok": True})

        status, stats = await _admin(fake, "GET", "/_fake/stats")
        assert status == 200 and stats["succeeded"] == 1

        assert await _admin(fake, "POST", "/_fake/reset") == (200, {"ok": True})
        status, stats = await _admin(fake, "GET", "/_fake/stats")
        assert stats["succeeded"] == 0 and stats["calls_by_request"] == {}
        assert stats["by_status"] == {} and stats["usage"]["output_tokens"] == 0

        status, config = await _admin(
            fake,
            "POST",
            "/_fake/config",
            {
                "latency_ms": 5,
                "rpm": 100,
                "family_limits": {"haiku": {"itpm": 5000}},
                "bad_keys": ["x"],
                "overloaded_rate": 0.25,
            },
        )
        assert status == 200
        assert config["latency_ms"] == 5 and config["rpm"] == 100
        assert config["family_limits"]["haiku"]["itpm"] == 5000
        assert fake.config.bad_keys == frozenset({"x"})
        assert (await _admin(fake, "GET", "/_fake/config"))[1] == config

        for bad in ({"rpm": 0}, {"nope": 1}, {"overloaded_rate": 2}, {"port": 1}, [1]):
            status, error = await _admin(fake, "POST", "/_fake/config", bad)
            assert status == 400, bad
            assert error["error"]["type"] == "invalid_request_error"
        assert fake.config.rpm == 100  # a refused patch changes nothing

        status, _ = await _admin(fake, "POST", "/_fake/reset", {"rate_limits": True, "cache": True})
        assert status == 200

    asyncio.run(scenario())


def test_python_api_mirrors_admin(fake: FakeClaudeServer) -> None:
    config = fake.update_config(rpm=5, bad_keys={"k"})
    assert config.rpm == 5 and config.bad_keys == frozenset({"k"})
    fake.reset(stats=True, rate_limits=True, cache=True)
    assert fake.stats()["requests_total"] == 0


def test_call_whose_client_gave_up_still_counts(start_fake: Any, make_client: Any) -> None:
    """Anthropic bills a call the client stopped waiting for; so does the fake's ledger."""
    server = start_fake(latency_ms=600)

    async def scenario() -> None:
        async with make_client(server, timeout=0.2) as claude:
            with contextlib.suppress(anthropic.APITimeoutError):
                await claude.messages.create(**_body(1))
        await asyncio.sleep(0.8)  # the server finishes its latency after the hang-up

    asyncio.run(scenario())
    stats = server.stats()
    assert stats["calls_by_request"] == {request_key(_body(1)): 1}
    assert stats["client_gone"] == 1


def test_params_seen_counts_each_top_level_field(start_fake: Any, make_client: Any) -> None:
    server = start_fake(overloaded_rate=1.0)

    async def scenario() -> None:
        async with make_client(server) as claude:
            for params in (
                _body(1),
                {**_body(2), "system": "terse", "extra_body": {"temperature": 0.2}},
                {**_body(3), "extra_body": {"nope": 1}},  # refused: not counted
            ):
                with contextlib.suppress(anthropic.APIStatusError):
                    await claude.messages.create(**params)

    asyncio.run(scenario())
    stats = server.stats()
    # A valid body counts even when it is then answered 529: the parameter did arrive.
    assert stats["by_status"] == {"400": 1, "529": 2}
    assert stats["params_seen"] == {
        "max_tokens": 2,
        "messages": 2,
        "metadata": 2,
        "model": 2,
        "system": 1,
        "temperature": 1,
    }
    server.reset()
    assert server.stats()["params_seen"] == {}


def test_recorded_requests(start_fake: Any, make_client: Any) -> None:
    server = start_fake(record_requests=2)
    url = f"{server.base_url}/v1/messages"

    async def post(body: Any) -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=body, headers={"x-api-key": "k"}) as response,
        ):
            return response.status

    async def scenario() -> None:
        for i in range(3):
            assert await post(_body(i)) == 200
        assert await post({"model": SONNET}) == 400  # invalid: not recorded
        status, recorded = await _admin(server, "GET", "/_fake/requests")
        assert status == 200
        assert recorded == {"requests": [_body(1), _body(2)]}

        # Recording follows the config at runtime; 0 keeps none.
        await _admin(server, "POST", "/_fake/config", {"record_requests": 3})
        assert await post(_body(3)) == 200
        assert server.requests() == [_body(1), _body(2), _body(3)]
        await _admin(server, "POST", "/_fake/config", {"record_requests": 0})
        assert await post(_body(4)) == 200
        assert (await _admin(server, "GET", "/_fake/requests"))[1] == {"requests": []}

        await _admin(server, "POST", "/_fake/config", {"record_requests": 5})
        assert await post(_body(5)) == 200
        assert await _admin(server, "POST", "/_fake/reset") == (200, {"ok": True})
        assert server.requests() == []

    asyncio.run(scenario())


def test_recorded_body_is_byte_for_byte_what_arrived(start_fake: Any) -> None:
    server = start_fake(record_requests=1)
    raw = (
        b'{"max_tokens": 9,  "model": "claude-sonnet-5",\n'
        b' "messages": [{"role": "user", "content": "\\u00e9t\\u00e9"}]}'
    )

    async def scenario() -> bytes:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{server.base_url}/v1/messages",
                data=raw,
                headers={"x-api-key": "k", "content-type": "application/json"},
            ) as response:
                assert response.status == 200
            async with session.get(f"{server.base_url}/_fake/requests") as response:
                return await response.read()

    assert asyncio.run(scenario()) == b'{"requests":[' + raw + b"]}"


def test_recording_is_off_by_default(fake: FakeClaudeServer, make_client: Any) -> None:
    async def scenario() -> None:
        async with make_client(fake) as claude:
            await claude.messages.create(**_body(1))

    asyncio.run(scenario())
    assert fake.requests() == []
    assert fake.stats()["params_seen"]["messages"] == 1
