"""`stream: true`: the same reply, sent as the Messages API's server-sent events.

The event order is Anthropic's (message_start, content_block_start, ping, deltas,
content_block_stop, message_delta, message_stop), enough for the SDK's `messages.stream()`
helper to rebuild the final message.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

_encode = msgspec.json.encode
_WORDS_PER_DELTA = 16


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encode(data) + b"\n\n"


def sse_events(message: dict[str, Any]) -> list[bytes]:
    """The whole stream of one finished message, as encoded events."""
    usage = message["usage"]
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 1},
    }
    text: str = message["content"][0]["text"]
    words = text.split(" ")
    events = [
        _event("message_start", {"type": "message_start", "message": start}),
        _event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        _event("ping", {"type": "ping"}),
    ]
    for i in range(0, len(words), _WORDS_PER_DELTA):
        chunk = " ".join(words[i : i + _WORDS_PER_DELTA])
        if i:
            chunk = " " + chunk
        events.append(
            _event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": chunk},
                },
            )
        )
    events += [
        _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        ),
        _event("message_stop", {"type": "message_stop"}),
    ]
    return events


async def stream_message(
    request: web.Request, message: dict[str, Any], headers: dict[str, str]
) -> web.StreamResponse:
    """Send `message` as an event stream; a client that hangs up just ends it."""
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = "text/event-stream"
    response.headers["cache-control"] = "no-cache"
    try:
        await response.prepare(request)
        await response.write(b"".join(sse_events(message)))
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        pass
    return response
