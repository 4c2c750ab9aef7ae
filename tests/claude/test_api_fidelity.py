"""The paid call sends every parameter and keeps everything the API answers, plain or
streamed, against the fake API (which records what it received)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.claude.api import call
from pipeline.claude.settings import ClaudeSettings
from pipeline.runtime.errors import PermanentError, TransientError
from tests.conftest import StartFake
from tests.stages.test_claude_call import client_for, routed

pytestmark = pytest.mark.anyio

TOOLS = [
    {
        "name": "lookup_order",
        "description": "Look an order up.",
        "input_schema": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}, "count": {"type": "integer"}},
            "required": ["order_id"],
        },
    }
]
SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative"]}},
    "required": ["sentiment"],
}
PLAIN = ClaudeSettings()
STREAMED = ClaudeSettings(stream_from_max_tokens=1)


@pytest.mark.parametrize("settings", [PLAIN, STREAMED], ids=["plain", "streamed"])
async def test_a_tool_call_comes_back_whole(
    start_fake: StartFake, settings: ClaudeSettings
) -> None:
    fake = start_fake(record_requests=10)
    params = {"tools": TOOLS, "tool_choice": {"type": "tool", "name": "lookup_order"}}
    async with client_for(fake) as client:
        answer = await call(client, routed(params=params), settings=settings)
    [sent] = fake.requests()
    assert sent["tools"] == TOOLS and sent["tool_choice"] == params["tool_choice"]
    assert sent.get("stream", False) is (settings is STREAMED)
    assert answer.stop_reason == "tool_use" and answer.output == ""
    [block] = json.loads(answer.blocks_json())
    assert block["type"] == "tool_use" and block["name"] == "lookup_order"
    assert block["id"].startswith("toolu_") and isinstance(block["input"]["order_id"], str)


async def test_plain_and_streamed_answers_are_the_same(start_fake: StartFake) -> None:
    fake = start_fake()
    requests: list[dict[str, Any]] = [
        {"tools": TOOLS},  # text, then tool_use
        {"stop_sequences": ["pipeline", "stream"]},
        {"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}},
    ]  # (a call with extended thinking is always streamed)
    async with client_for(fake) as client:
        for params in requests:
            task = routed(params=params, max_tokens=2048)
            plain = await call(client, task, settings=PLAIN)
            streamed = await call(client, task, settings=STREAMED)
            assert (streamed.content, streamed.output, streamed.stop_reason) == (
                plain.content, plain.output, plain.stop_reason,
            ), params  # fmt: skip
            assert (streamed.stop_sequence, streamed.usage) == (plain.stop_sequence, plain.usage)
            assert streamed.content or streamed.output, params


async def test_each_parameter_reaches_the_api_and_its_answer_comes_back(
    start_fake: StartFake,
) -> None:
    fake = start_fake(record_requests=10)
    async with client_for(fake) as client:
        thought = await call(
            client, routed(params={"thinking": {"type": "enabled", "budget_tokens": 1024}},
                           max_tokens=4096), settings=PLAIN,
        )  # fmt: skip
        structured = await call(
            client, routed(params={"output_config": {"format": {"type": "json_schema",
                                                                "schema": SCHEMA}}}),
            settings=PLAIN,
        )  # fmt: skip
        stopped = await call(client, routed(params={"stop_sequences": ["stream"]}), settings=PLAIN)
        sampled = await call(
            client,
            routed(params={"top_p": 0.5, "top_k": 7, "service_tier": "standard_only",
                           "metadata": {"user_id": "u-1"}, "inference_geo": "us"}),
            settings=PLAIN,
        )  # fmt: skip
    bodies = fake.requests()
    assert bodies[0]["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert bodies[0]["stream"] is True, "extended thinking is streamed"
    kinds = [b["type"] for b in json.loads(thought.blocks_json())]
    assert kinds == ["thinking", "text"] and json.loads(thought.content)[0]["signature"]
    assert json.loads(structured.output)["sentiment"] in ("positive", "negative")
    assert bodies[1]["output_config"]["format"]["schema"] == SCHEMA
    assert bodies[2]["stop_sequences"] == ["stream"]
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "stream")
    assert "stream" not in stopped.output
    sent = bodies[3]
    assert (sent["top_p"], sent["top_k"], sent["service_tier"]) == (0.5, 7, "standard_only")
    assert (sent["metadata"], sent["inference_geo"]) == ({"user_id": "u-1"}, "us")
    assert json.loads(sampled.api_usage)["service_tier"] == "standard"
    assert sampled.message_id.startswith("msg_") and sampled.request_id.startswith("req_")


async def test_a_parameter_the_api_does_not_know_fails_with_its_reason(
    start_fake: StartFake,
) -> None:
    fake = start_fake()
    async with client_for(fake) as client:
        with pytest.raises(PermanentError, match="not_a_parameter: Extra inputs are not permitted"):
            await call(client, routed(params={"not_a_parameter": 1}), settings=PLAIN)


@pytest.mark.parametrize(
    ("fault", "message"),
    [("stream_error_rate", "overloaded_error"), ("stream_cut_rate", "connection error mid-stream")],
)
async def test_a_stream_broken_half_way_is_a_transient_error(
    start_fake: StartFake, fault: str, message: str
) -> None:
    fake = start_fake(**{fault: 1.0}, min_output_tokens=200, max_output_tokens=200)
    async with client_for(fake) as client:
        with pytest.raises(TransientError, match=message):
            await call(client, routed(max_tokens=1000), settings=STREAMED)
    stats = fake.stats()
    assert stats["calls_by_request"] == {}, "a broken stream is no answer"
