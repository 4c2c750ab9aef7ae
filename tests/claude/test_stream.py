"""Long calls stream: the events are assembled into the message a plain call returns
(`pipeline.claude.stream`), and a stream that breaks is an error the runtime can retry."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from pipeline.claude.api import call
from pipeline.claude.long_calls import call_timeout_s, streams
from pipeline.claude.settings import ClaudeSettings
from pipeline.claude.stream import StreamBroken, assemble
from pipeline.runtime.errors import TransientError
from tests.conftest import StartFake
from tests.stages.test_claude_call import client_for, routed


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"event: {e['type']}\r\ndata: {json.dumps(e)}\r\n\r\n".encode() for e in events)


START = {
    "type": "message_start",
    "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 1, "service_tier": "standard"},
    },
}  # fmt: skip


def delta(index: int, **d: Any) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": d}


def block(index: int, **b: Any) -> dict[str, Any]:
    return {"type": "content_block_start", "index": index, "content_block": b}


def stop(index: int) -> dict[str, Any]:
    return {"type": "content_block_stop", "index": index}


CITE = {"type": "char_location", "cited_text": "x"}
END = [
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 42, "server_tool_use": {"web_search_requests": 0}},
    },
    {"type": "message_stop"},
]


def test_every_kind_of_block_is_assembled_as_the_api_would_return_it() -> None:
    body = sse(
        START,
        block(0, type="thinking", thinking="", signature=""),
        {"type": "ping"},
        delta(0, type="thinking_delta", thinking="Let me "),
        delta(0, type="thinking_delta", thinking="think."),
        delta(0, type="signature_delta", signature="c2ln"),
        stop(0),
        block(1, type="text", text=""),
        delta(1, type="text_delta", text="See "),
        delta(1, type="citations_delta", citation=CITE),
        delta(1, type="text_delta", text="this."),
        stop(1),
        block(2, type="tool_use", id="toolu_1", name="lookup", input={}),
        delta(2, type="input_json_delta", partial_json='{"q": "we'),
        delta(2, type="input_json_delta", partial_json='ather"}'),
        stop(2),
        block(3, type="tool_use", id="toolu_2", name="now", input={}),
        stop(3),
        {"type": "a_future_event", "data": 1},
        *END,
    )
    message = assemble(body)
    assert (message.id, message.model) == ("msg_1", "claude-x")
    assert (message.stop_reason, message.stop_sequence) == ("tool_use", None)
    assert msgspec.json.decode(message.content) == [
        {"type": "thinking", "thinking": "Let me think.", "signature": "c2ln"},
        {"type": "text", "text": "See this.", "citations": [CITE]},
        {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "weather"}},
        {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}},
    ]  # fmt: skip
    assert msgspec.json.decode(message.usage) == {
        "input_tokens": 10, "output_tokens": 42, "service_tier": "standard",
        "server_tool_use": {"web_search_requests": 0},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("events", "error_type", "message"),
    [
        (
            [START, block(0, type="text", text=""), delta(0, type="text_delta", text="Hal"),
             {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}],
            "overloaded_error",
            "claude stream overloaded_error: Overloaded",
        ),
        ([START, block(0, type="text", text=""), delta(0, type="text_delta", text="Hal")],
         None, "claude: stream cut before message_stop"),
        ([{"type": "message_stop"}], None, "claude: stream ended without message_start"),
    ],
    ids=["error-event", "cut", "no-start"],
)  # fmt: skip
def test_a_stream_that_does_not_end_in_a_whole_message_is_broken(
    events: list[dict[str, Any]], error_type: str | None, message: str
) -> None:
    with pytest.raises(StreamBroken) as caught:
        assemble(sse(*events))
    assert caught.value.error_type == error_type
    assert str(caught.value).startswith(message)
    with pytest.raises(StreamBroken, match="unreadable stream event"):
        assemble(b"event: ping\ndata: {not json\n\n")


def test_a_delta_of_an_unknown_type_is_skipped_as_the_sdk_does() -> None:
    body = sse(START, block(0, type="text", text=""), delta(0, type="text_delta", text="Hi"),
               delta(0, type="sparkle_delta", x=1), stop(0), *END)  # fmt: skip
    assert msgspec.json.decode(assemble(body).content) == [{"type": "text", "text": "Hi"}]


def test_which_calls_stream_and_how_long_they_may_take() -> None:
    settings = ClaudeSettings(stream_from_max_tokens=20_000, timeout_s=600, stream_timeout_s=3600)
    thinking = {"thinking": {"type": "enabled", "budget_tokens": 1024}}
    assert not streams(routed(max_tokens=19_999), settings)
    assert streams(routed(max_tokens=20_000), settings)
    assert streams(routed(max_tokens=2_000, params=thinking), settings)
    assert streams(routed(params={"thinking": {"type": "adaptive"}}), settings)
    assert not streams(routed(params={"thinking": {"type": "disabled"}}), settings)
    assert call_timeout_s(routed(max_tokens=64_000), settings) == 3600
    assert call_timeout_s(routed(), settings) == 600


@pytest.mark.anyio
async def test_a_streamed_call_answers_as_a_plain_one(start_fake: StartFake) -> None:
    fake = start_fake(min_output_tokens=300, max_output_tokens=300)
    async with client_for(fake) as client:
        plain = await call(client, routed(max_tokens=32_000), settings=ClaudeSettings())
        streamed = await call(
            client, routed(max_tokens=32_000), settings=ClaudeSettings(stream_from_max_tokens=1)
        )
    assert streamed.output == plain.output and len(plain.output.split()) == 300
    assert (streamed.content, streamed.stop_reason, streamed.usage) == (
        plain.content, plain.stop_reason, plain.usage,
    )  # fmt: skip
    assert streamed.message_id.startswith("msg_") and streamed.message_id != plain.message_id
    assert streamed.request_id.startswith("req_") and streamed.request_id != plain.request_id
    assert json.loads(streamed.api_usage)["output_tokens"] == 300


@pytest.mark.anyio
async def test_a_stream_waits_for_its_first_byte_no_longer_than_the_idle_timeout(
    start_fake: StartFake,
) -> None:
    fake = start_fake(latency_ms=3_000)
    settings = ClaudeSettings(stream_from_max_tokens=1, stream_idle_timeout_s=0.5)
    async with client_for(fake) as client:
        with pytest.raises(TransientError, match="timed out"):
            await call(client, routed(), settings=settings)


@pytest.mark.anyio
async def test_a_stream_is_bounded_by_its_whole_call_timeout(start_fake: StartFake) -> None:
    fake = start_fake(latency_ms=3_000)
    settings = ClaudeSettings(
        stream_from_max_tokens=1, stream_idle_timeout_s=30, stream_timeout_s=0.5
    )
    async with client_for(fake) as client:
        with pytest.raises(TransientError, match="timed out"):
            await call(client, routed(), settings=settings)
