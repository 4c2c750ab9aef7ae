"""The Messages endpoint as the real SDK sees it: shapes, determinism, auth, validation."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import anthropic
import pytest

from pipeline.fake_claude import FakeClaudeServer, count_tokens

SONNET = "claude-sonnet-5"
HAIKU = "claude-haiku-5-5"


def test_success_shape_and_determinism(fake: FakeClaudeServer, make_client: Any) -> None:
    prompt = "Summarise the plot of Hamlet in one line."

    async def scenario() -> tuple[Any, Any, Any]:
        async with make_client(fake) as claude:
            raw = await claude.messages.with_raw_response.create(
                model=SONNET, max_tokens=1024, messages=[{"role": "user", "content": prompt}]
            )
            first = await raw.parse()
            again = await claude.messages.create(
                model=SONNET, max_tokens=1024, messages=[{"role": "user", "content": prompt}]
            )
            other = await claude.messages.create(
                model=SONNET, max_tokens=1024, messages=[{"role": "user", "content": "Other."}]
            )
            return raw, first, (again, other)

    raw, first, (again, other) = asyncio.run(scenario())
    assert raw.http_response.status_code == 200
    assert raw.headers["request-id"].startswith("req_")
    assert first._request_id == raw.headers["request-id"]
    assert first.id.startswith("msg_") and first.id != again.id
    assert first.type == "message" and first.role == "assistant" and first.model == SONNET
    assert [block.type for block in first.content] == ["text"]
    assert first.stop_reason == "end_turn" and first.stop_sequence is None
    assert 20 <= first.usage.output_tokens <= 400
    assert len(first.content[0].text.split()) == first.usage.output_tokens
    assert first.usage.input_tokens == count_tokens(prompt)
    assert first.usage.cache_creation_input_tokens == 0
    assert first.usage.cache_read_input_tokens == 0
    # Same request, same answer; another request, another answer.
    assert again.content[0].text == first.content[0].text
    assert again.usage == first.usage
    assert other.content[0].text != first.content[0].text


def test_system_blocks_and_parameters_are_accepted(
    fake: FakeClaudeServer, make_client: Any
) -> None:
    async def scenario() -> Any:
        async with make_client(fake) as claude:
            return await claude.messages.create(
                model=HAIKU,
                max_tokens=300,
                system=[{"type": "text", "text": "You are terse."}],
                messages=[
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Bye"},
                ],
                stop_sequences=["\n\nHuman:"],
                # This SDK version dropped these parameters; the API still takes them.
                extra_body={"temperature": 0.0, "top_p": 0.9, "top_k": 5},
                metadata={"user_id": "task-1"},
            )

    message = asyncio.run(scenario())
    expected = sum(count_tokens(t) for t in ("You are terse.", "Hi", "Hello.", "Bye"))
    assert message.usage.input_tokens == expected


def test_max_tokens_truncates(fake: FakeClaudeServer, make_client: Any) -> None:
    async def scenario() -> Any:
        async with make_client(fake) as claude:
            return await claude.messages.create(
                model=SONNET, max_tokens=5, messages=[{"role": "user", "content": "Long essay"}]
            )

    message = asyncio.run(scenario())
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 5
    assert len(message.content[0].text.split()) == 5


def test_stream_gives_the_same_message(fake: FakeClaudeServer, make_client: Any) -> None:
    messages = [{"role": "user", "content": "Stream me"}]

    async def scenario() -> tuple[Any, Any]:
        async with make_client(fake) as claude:
            plain = await claude.messages.create(model=SONNET, max_tokens=500, messages=messages)
            async with claude.messages.stream(
                model=SONNET, max_tokens=500, messages=messages
            ) as stream:
                streamed = await stream.get_final_message()
            return plain, streamed

    plain, streamed = asyncio.run(scenario())
    assert streamed.content[0].text == plain.content[0].text
    assert streamed.stop_reason == plain.stop_reason == "end_turn"
    assert streamed.usage.output_tokens == plain.usage.output_tokens
    assert fake.stats()["calls_by_request"] == {next(iter(fake.stats()["calls_by_request"])): 2}


def test_count_tokens(fake: FakeClaudeServer, make_client: Any) -> None:
    async def scenario() -> Any:
        async with make_client(fake) as claude:
            return await claude.messages.count_tokens(
                model=SONNET,
                system="sys prompt",
                messages=[{"role": "user", "content": "abcdefgh"}],
            )

    assert asyncio.run(scenario()).input_tokens == count_tokens("sys prompt") + 2


def test_bearer_token_is_accepted(fake: FakeClaudeServer, make_client: Any) -> None:
    async def scenario() -> Any:
        async with make_client(fake, api_key=None, auth_token="oauth-token") as claude:
            return await claude.messages.create(
                model=SONNET, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
            )

    assert asyncio.run(scenario()).type == "message"
    assert "oauth-token|sonnet" in fake.stats()["by_key_family"]


async def _post(url: str, body: object, headers: dict[str, str]) -> tuple[int, Any, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as response,
    ):
        return response.status, response.headers.copy(), await response.json()


def test_x_api_key_header_and_missing_key(fake: FakeClaudeServer) -> None:
    body = {"model": SONNET, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    url = f"{fake.base_url}/v1/messages"
    status, _, payload = asyncio.run(_post(url, body, {"x-api-key": "plain-key"}))
    assert status == 200 and payload["type"] == "message"

    status, headers, payload = asyncio.run(_post(url, body, {}))
    assert status == 401
    assert headers["request-id"] == payload["request_id"]
    assert payload["type"] == "error"
    assert payload["error"]["type"] == "authentication_error"


def test_bad_key_then_fixed_at_runtime(start_fake: Any, make_client: Any) -> None:
    server = start_fake(bad_keys=frozenset({"sk-revoked"}))

    async def call() -> Any:
        async with make_client(server, api_key="sk-revoked") as claude:
            return await claude.messages.create(
                model=SONNET, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
            )

    with pytest.raises(anthropic.AuthenticationError) as caught:
        asyncio.run(call())
    assert caught.value.status_code == 401
    assert caught.value.type == "authentication_error"
    assert caught.value.request_id is not None

    # The operator rotates the key: the admin endpoint forgets it is bad.
    status, _, config = asyncio.run(_post(f"{server.base_url}/_fake/config", {"bad_keys": []}, {}))
    assert status == 200 and config["bad_keys"] == []
    assert asyncio.run(call()).type == "message"


def test_forbidden_key_is_403(start_fake: Any, make_client: Any) -> None:
    server = start_fake(forbidden_keys=frozenset({"sk-readonly"}))

    async def call() -> Any:
        async with make_client(server, api_key="sk-readonly") as claude:
            return await claude.messages.create(
                model=SONNET, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
            )

    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        asyncio.run(call())
    assert caught.value.status_code == 403 and caught.value.type == "permission_error"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"extra_body": {"temperature": 1.5}}, "temperature"),
        ({"extra_body": {"top_k": -1}}, "top_k"),
        ({"messages": [{"role": "system", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": ""}]}, "non-empty"),
        ({"system": 5}, "system"),
        ({"stop_sequences": "STOP"}, "stop_sequences"),
        ({"metadata": {"user_id": 7}}, "user_id"),
    ],
)
def test_invalid_request_is_400(
    fake: FakeClaudeServer, make_client: Any, overrides: dict[str, Any], needle: str
) -> None:
    params: dict[str, Any] = {
        "model": SONNET,
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}],
        **overrides,
    }

    async def call() -> Any:
        async with make_client(fake) as claude:
            return await claude.messages.create(**params)

    with pytest.raises(anthropic.BadRequestError) as caught:
        asyncio.run(call())
    assert caught.value.type == "invalid_request_error"
    assert needle in (caught.value.api_message or "")
    assert caught.value.request_id is not None


def test_malformed_json_and_missing_fields(fake: FakeClaudeServer) -> None:
    async def post_raw(data: bytes) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{fake.base_url}/v1/messages",
                data=data,
                headers={"x-api-key": "k", "content-type": "application/json"},
            ) as response,
        ):
            return response.status, await response.json()

    for data, needle in [
        (b"{not json", "parsing"),
        (b"[]", "JSON object"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 5}', "model"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}', "max_tokens"),
        (b'{"model": "m", "max_tokens": 5}', "messages"),
    ]:
        status, payload = asyncio.run(post_raw(data))
        assert status == 400, data
        assert payload["error"]["type"] == "invalid_request_error"
        assert needle in payload["error"]["message"], (data, payload)


def test_unknown_path_is_a_json_404(fake: FakeClaudeServer) -> None:
    status, _, payload = asyncio.run(_post(f"{fake.base_url}/v1/nope", {}, {"x-api-key": "k"}))
    assert status == 404 and payload["error"]["type"] == "not_found_error"


def test_oversized_body_is_413(start_fake: Any, make_client: Any) -> None:
    server = start_fake(max_body_bytes=2000)

    async def call() -> Any:
        async with make_client(server) as claude:
            return await claude.messages.create(
                model=SONNET, max_tokens=50, messages=[{"role": "user", "content": "x" * 5000}]
            )

    with pytest.raises(anthropic.APIStatusError) as caught:
        asyncio.run(call())
    assert caught.value.status_code == 413 and caught.value.type == "request_too_large"
