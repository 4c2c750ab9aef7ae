"""`stream: true`: the same reply, sent as the Messages API's server-sent events.

The event order is Anthropic's: message_start, then per block content_block_start (ping after
the first), its deltas (`text_delta`, `input_json_delta`, `thinking_delta` then one
`signature_delta`) and content_block_stop, then message_delta and message_stop; the SDK's
`messages.stream()` helper rebuilds the very message a plain call gets.

A stream can also fail as the real one does: after message_start and about half the deltas,
an `error` event (then the response ends) or a connection closed without message_stop.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
from aiohttp import web

_encode = msgspec.json.encode
_WORDS_PER_DELTA = 16
_JSON_CHARS_PER_DELTA = 32
_DELTA = b"event: content_block_delta\n"
#: What the API sends when it is overloaded mid-stream (byte for byte its documented event).
ERROR_EVENT = (
    b"event: error\n"
    b'data: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n'
)
#: The faults `stream_message` can inject.
STREAM_ERROR, STREAM_CUT = "error", "cut"


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encode(data) + b"\n\n"


def _text_chunks(text: str) -> Iterator[str]:
    words = text.split(" ")
    for i in range(0, len(words), _WORDS_PER_DELTA):
        chunk = " ".join(words[i : i + _WORDS_PER_DELTA])
        yield " " + chunk if i else chunk


def _block_events(index: int, block: dict[str, Any]) -> list[bytes]:
    """content_block_start, the deltas that rebuild `block`, content_block_stop."""
    kind = block["type"]
    if kind == "text":
        start: dict[str, Any] = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": chunk} for chunk in _text_chunks(block["text"])]
    elif kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        thinking = block["thinking"]
        deltas = [
            {"type": "thinking_delta", "thinking": chunk}
            for chunk in (_text_chunks(thinking) if thinking else ())
        ]
        deltas.append({"type": "signature_delta", "signature": block["signature"]})
    elif kind == "tool_use":
        start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
        encoded = _encode(block["input"]).decode()
        deltas = [{"type": "input_json_delta", "partial_json": ""}]
        deltas += [
            {"type": "input_json_delta", "partial_json": encoded[i : i + _JSON_CHARS_PER_DELTA]}
            for i in range(0, len(encoded), _JSON_CHARS_PER_DELTA)
        ]
    else:  # pragma: no cover - the fake makes no other blocks
        raise ValueError(f"cannot stream a {kind!r} block")
    events = [
        _event(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": start},
        )
    ]
    events += [
        _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
        for d in deltas
    ]
    events.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


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
    events = [_event("message_start", {"type": "message_start", "message": start})]
    ping = _event("ping", {"type": "ping"})
    for index, block in enumerate(message["content"]):
        blocks = _block_events(index, block)
        events += [blocks[0], ping, *blocks[1:]] if index == 0 else blocks
    if not message["content"]:
        events.append(ping)
    delta_usage = {"output_tokens": usage["output_tokens"]}
    if "server_tool_use" in usage:
        delta_usage["server_tool_use"] = usage["server_tool_use"]
    events += [
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": message["stop_reason"],
                    "stop_sequence": message["stop_sequence"],
                },
                "usage": delta_usage,
            },
        ),
        _event("message_stop", {"type": "message_stop"}),
    ]
    return events


def fault_point(events: list[bytes]) -> int:
    """Where a failing stream stops: after message_start and half its deltas (rounded down)."""
    deltas = [i for i, event in enumerate(events) if event.startswith(_DELTA)]
    if not deltas:
        return 1
    return deltas[len(deltas) // 2]


async def stream_message(
    request: web.Request,
    message: dict[str, Any],
    headers: dict[str, str],
    fault: str | None = None,
) -> web.StreamResponse:
    """Send `message` as an event stream; a client that hangs up just ends it.

    `fault` STREAM_ERROR ends the stream early with the API's overloaded `error` event;
    STREAM_CUT closes the connection early, without ending the chunked body.
    """
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = "text/event-stream"
    response.headers["cache-control"] = "no-cache"
    events = sse_events(message)
    if fault is not None:
        events = events[: fault_point(events)]
        if fault == STREAM_ERROR:
            events.append(ERROR_EVENT)
    try:
        await response.prepare(request)
        await response.write(b"".join(events))
        if fault == STREAM_CUT:
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        pass
    return response
