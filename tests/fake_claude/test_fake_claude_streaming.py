"""Streaming every kind of block: the SDK's stream helper rebuilds the plain call's message,
and the events are framed as the API frames them."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx2
import pytest

from pipeline.fake_claude import FakeClaudeServer

SONNET = "claude-sonnet-5"
ASK = [{"role": "user", "content": "Plan a trip to Lyon."}]
TRIP_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "nights": {"type": "integer", "minimum": 1},
        "stops": {"type": "array", "items": {"type": "string"}, "minItems": 3},
    },
    "required": ["city", "nights", "stops"],
    "additionalProperties": False,
}
BOOK = {"name": "book_hotel", "input_schema": TRIP_SCHEMA}
SEARCH = {"type": "web_search_20250305", "name": "web_search"}

CASES: dict[str, dict[str, Any]] = {
    "text": {},
    "text cut by max_tokens": {"max_tokens": 7},
    "tools auto": {"tools": [SEARCH, BOOK]},
    "tools any": {"tools": [BOOK], "tool_choice": {"type": "any"}},
    "thinking": {"thinking": {"type": "enabled", "budget_tokens": 1024}},
    "thinking omitted, then tools": {
        "thinking": {"type": "adaptive", "display": "omitted"},
        "tools": [BOOK],
    },
    "thinking cut by max_tokens": {"thinking": {"type": "adaptive"}, "max_tokens": 9},
    "stop sequence": {"stop_sequences": ["-"]},
    "stop sequence at the start (no block)": {"stop_sequences": ["fake"]},
    "structured output": {
        "output_config": {"format": {"type": "json_schema", "schema": TRIP_SCHEMA}}
    },
}


def _blocks(message: Any) -> list[dict[str, Any]]:
    return [block.model_dump(exclude={"parsed_output"}) for block in message.content]


@pytest.mark.parametrize("case", list(CASES))
def test_stream_rebuilds_the_plain_message(
    fake: FakeClaudeServer, make_client: Any, case: str
) -> None:
    params = {"model": SONNET, "max_tokens": 2048, "messages": ASK, **CASES[case]}

    async def scenario() -> tuple[Any, Any]:
        async with make_client(fake) as claude:
            plain = await claude.messages.create(**params)
            async with claude.messages.stream(**params) as stream:
                streamed = await stream.get_final_message()
            return plain, streamed

    plain, streamed = asyncio.run(scenario())
    assert _blocks(streamed) == _blocks(plain)
    assert streamed.stop_reason == plain.stop_reason
    assert streamed.stop_sequence == plain.stop_sequence
    assert streamed.usage == plain.usage
    assert fake.stats()["calls_by_request"] == {next(iter(fake.stats()["calls_by_request"])): 2}


def _events(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for chunk in text.strip().split("\n\n"):
        name_line, data_line = chunk.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line[6:])
        assert data["type"] == name_line[7:]
        out.append((name_line[7:], data))
    return out


def test_events_are_framed_like_the_api(fake: FakeClaudeServer) -> None:
    body = {
        "model": SONNET,
        "max_tokens": 2048,
        "messages": ASK,
        "stream": True,
        "thinking": {"type": "adaptive"},
        "tools": [BOOK],
    }

    async def post() -> httpx2.Response:
        async with httpx2.AsyncClient() as http:
            return await http.post(
                f"{fake.base_url}/v1/messages", json=body, headers={"x-api-key": "k"}
            )

    response = asyncio.run(post())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["output_tokens"] == 1

    starts = [data for name, data in events if name == "content_block_start"]
    assert [s["index"] for s in starts] == [0, 1, 2]
    thinking, text, tool = (s["content_block"] for s in starts)
    assert thinking == {"type": "thinking", "thinking": "", "signature": ""}
    assert text == {"type": "text", "text": ""}
    assert tool["type"] == "tool_use" and tool["input"] == {} and tool["name"] == "book_hotel"
    assert tool["id"].startswith("toolu_fake")

    def deltas(index: int) -> list[dict[str, Any]]:
        return [
            data["delta"]
            for name, data in events
            if name == "content_block_delta" and data["index"] == index
        ]

    thought = deltas(0)
    assert {d["type"] for d in thought[:-1]} == {"thinking_delta"}
    assert thought[-1]["type"] == "signature_delta" and thought[-1]["signature"]
    assert {d["type"] for d in deltas(1)} == {"text_delta"}
    partial = deltas(2)
    assert {d["type"] for d in partial} == {"input_json_delta"}
    assert partial[0]["partial_json"] == "" and len(partial) > 2
    tool_input = json.loads("".join(d["partial_json"] for d in partial))
    assert set(tool_input) == {"city", "nights", "stops"} and len(tool_input["stops"]) >= 3

    # Each block is closed before the next opens.
    opened = None
    for name, data in events:
        if name == "content_block_start":
            assert opened is None
            opened = data["index"]
        elif name == "content_block_delta":
            assert data["index"] == opened
        elif name == "content_block_stop":
            assert data["index"] == opened
            opened = None
    final = events[-2][1]
    assert final["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert final["usage"]["output_tokens"] > 1
