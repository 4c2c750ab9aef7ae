"""Prompt caching: cache_creation on first sight of a prefix, cache_read after, per API key."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anthropic
import pytest

from pipeline.fake_claude import FakeClaudeServer, count_tokens

SONNET = "claude-sonnet-5"
HAIKU = "claude-haiku-5-5"
LONG_SYSTEM = "You are a meticulous reviewer. " * 200  # ~1,550 tokens


def _create(
    server: FakeClaudeServer, make_client: Any, api_key: str = "sk-a", **params: Any
) -> Any:
    async def scenario() -> Any:
        async with make_client(server, api_key=api_key) as claude:
            return await claude.messages.create(**{"model": SONNET, "max_tokens": 50, **params})

    return asyncio.run(scenario())


def _cached_system(ttl: str | None = None) -> list[dict[str, Any]]:
    cache_control: dict[str, Any] = {"type": "ephemeral"}
    if ttl:
        cache_control["ttl"] = ttl
    return [{"type": "text", "text": LONG_SYSTEM, "cache_control": cache_control}]


def test_creation_then_read_then_other_key(fake: FakeClaudeServer, make_client: Any) -> None:
    prefix = count_tokens(LONG_SYSTEM)
    first = _create(
        fake,
        make_client,
        system=_cached_system(),
        messages=[{"role": "user", "content": "Review chapter one."}],
    )
    assert first.usage.cache_creation_input_tokens == prefix
    assert first.usage.cache_creation.ephemeral_5m_input_tokens == prefix
    assert first.usage.cache_read_input_tokens == 0
    assert first.usage.input_tokens == count_tokens("Review chapter one.")

    second = _create(
        fake,
        make_client,
        system=_cached_system(),
        messages=[{"role": "user", "content": "Review chapter two, please."}],
    )
    assert second.usage.cache_creation_input_tokens == 0
    assert second.usage.cache_read_input_tokens == prefix
    assert second.usage.input_tokens == count_tokens("Review chapter two, please.")

    other_key = _create(
        fake,
        make_client,
        api_key="sk-b",
        system=_cached_system(),
        messages=[{"role": "user", "content": "Review chapter two, please."}],
    )
    assert other_key.usage.cache_creation_input_tokens == prefix

    other_model = _create(
        fake,
        make_client,
        model=HAIKU,
        system=_cached_system(),
        messages=[{"role": "user", "content": "Review chapter two, please."}],
    )
    assert other_model.usage.cache_creation_input_tokens == prefix

    usage = fake.stats()["usage"]
    assert usage["cache_creation_input_tokens"] == 3 * prefix
    assert usage["cache_read_input_tokens"] == prefix


def test_without_cache_control_nothing_is_cached(fake: FakeClaudeServer, make_client: Any) -> None:
    for _ in range(2):
        message = _create(
            fake, make_client, system=LONG_SYSTEM, messages=[{"role": "user", "content": "hi"}]
        )
        assert message.usage.cache_creation_input_tokens == 0
        assert message.usage.cache_read_input_tokens == 0
        assert message.usage.input_tokens == count_tokens(LONG_SYSTEM) + count_tokens("hi")


def test_multiple_breakpoints_and_one_hour_ttl(fake: FakeClaudeServer, make_client: Any) -> None:
    document = "Clause 7 applies. " * 100
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": document, "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Question one?"},
            ],
        }
    ]
    first = _create(fake, make_client, system=_cached_system("1h"), messages=messages)
    sys_tokens, doc_tokens = count_tokens(LONG_SYSTEM), count_tokens(document)
    assert first.usage.cache_creation.ephemeral_1h_input_tokens == sys_tokens
    assert first.usage.cache_creation.ephemeral_5m_input_tokens == doc_tokens
    assert first.usage.input_tokens == count_tokens("Question one?")

    # Same system, another document: the system prefix is read, the document is written.
    messages[0]["content"][0]["text"] = "Clause 9 applies. " * 100
    second = _create(fake, make_client, system=_cached_system("1h"), messages=messages)
    assert second.usage.cache_read_input_tokens == sys_tokens
    assert second.usage.cache_creation_input_tokens == count_tokens("Clause 9 applies. " * 100)


def test_top_level_cache_control_marks_the_last_block(
    fake: FakeClaudeServer, make_client: Any
) -> None:
    messages = [{"role": "user", "content": "Please read this. " * 50}]
    total = count_tokens("Please read this. " * 50)
    first = _create(fake, make_client, messages=messages, cache_control={"type": "ephemeral"})
    assert first.usage.cache_creation_input_tokens == total
    assert first.usage.input_tokens == 0
    again = _create(fake, make_client, messages=messages, cache_control={"type": "ephemeral"})
    assert again.usage.cache_read_input_tokens == total


def test_cache_expires(start_fake: Any, make_client: Any) -> None:
    server = start_fake(cache_ttl_s=0.3)
    params = {"system": _cached_system(), "messages": [{"role": "user", "content": "hi"}]}
    assert _create(server, make_client, **params).usage.cache_creation_input_tokens > 0
    assert _create(server, make_client, **params).usage.cache_read_input_tokens > 0
    time.sleep(0.4)
    assert _create(server, make_client, **params).usage.cache_creation_input_tokens > 0


def test_short_prefixes_are_not_cached_when_a_minimum_is_set(
    start_fake: Any, make_client: Any
) -> None:
    server = start_fake(cache_min_tokens=4096)
    message = _create(
        server, make_client, system=_cached_system(), messages=[{"role": "user", "content": "hi"}]
    )
    assert message.usage.cache_creation_input_tokens == 0
    assert message.usage.input_tokens == count_tokens(LONG_SYSTEM) + count_tokens("hi")


def test_cache_reads_do_not_count_against_itpm(start_fake: Any, make_client: Any) -> None:
    prefix = count_tokens(LONG_SYSTEM)
    server = start_fake(itpm=prefix + 100)
    params = {"system": _cached_system(), "messages": [{"role": "user", "content": "hi"}]}
    _create(server, make_client, **params)
    for _ in range(3):  # each only pays for "hi"
        assert _create(server, make_client, **params).usage.cache_read_input_tokens == prefix


def test_too_many_breakpoints_is_400(fake: FakeClaudeServer, make_client: Any) -> None:
    blocks = [
        {"type": "text", "text": f"part {i}", "cache_control": {"type": "ephemeral"}}
        for i in range(5)
    ]
    with pytest.raises(anthropic.BadRequestError, match="maximum of 4"):
        _create(fake, make_client, messages=[{"role": "user", "content": blocks}])
    with pytest.raises(anthropic.BadRequestError, match="cache_control"):
        _create(
            fake,
            make_client,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "x", "cache_control": {"type": "forever"}}
                    ],
                }
            ],
        )
