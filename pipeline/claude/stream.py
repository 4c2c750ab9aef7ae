"""A streamed Messages response (server-sent events) assembled into the final message.

Long calls stream (`pipeline.claude.api`): the connection carries events, so no proxy cuts it
as idle, and a silent API is noticed within the idle timeout rather than the whole call's.
The events are folded here into what a non-streamed call returns (id, model, content, stop
reason and sequence, usage) following the API's framing: `message_start`, per block
`content_block_start`, deltas (`text_delta`, `input_json_delta`, `thinking_delta`,
`signature_delta`, `citations_delta`), `content_block_stop`, `message_delta`, `message_stop`.
Unknown event and delta types (the API may add some) are skipped, as Anthropic asks and the
SDK does; an `error` event or a stream without `message_stop` raise `StreamBroken`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

__all__ = ["Assembled", "StreamBroken", "assemble"]

_decode = msgspec.json.decode
_encode = msgspec.json.encode
#: Where each kind of delta appends its text, by delta type: (block field, delta field).
_TEXT_DELTAS = {
    "text_delta": ("text", "text"),
    "thinking_delta": ("thinking", "thinking"),
    "input_json_delta": ("input", "partial_json"),
}


class StreamBroken(Exception):
    """The stream did not end in a whole message. `error_type` is the API's error type when
    an `error` event said why (e.g. `overloaded_error`), else None (cut, or unreadable)."""

    def __init__(self, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type


@dataclass(frozen=True, slots=True)
class Assembled:
    """The final message, with `content` and `usage` as the API's JSON."""

    id: str
    model: str
    content: bytes
    stop_reason: str | None
    stop_sequence: str | None
    usage: bytes


def assemble(body: bytes) -> Assembled:
    """Fold a whole event stream into the message it carried.

    Raises:
        StreamBroken: an error event, an unknown delta, or no `message_stop`.
    """
    message: dict[str, Any] | None = None
    usage: dict[str, Any] = {}
    blocks: list[dict[str, Any]] = []
    parts: list[dict[str, list[str]]] = []  # per block: field -> text pieces, joined at stop
    delta: dict[str, Any] = {}
    for data in _events(body):
        kind = data.get("type")
        if kind == "content_block_delta":
            _add_delta(blocks, parts, data)
        elif kind == "content_block_start":
            blocks.append(dict(data["content_block"]))
            parts.append({})
        elif kind == "content_block_stop":
            _close_block(blocks, parts, data["index"])
        elif kind == "message_start":
            message = data["message"]
            usage = dict(message.get("usage") or {})
        elif kind == "message_delta":
            delta = data.get("delta") or {}
            usage.update({k: v for k, v in (data.get("usage") or {}).items() if v is not None})
        elif kind == "message_stop":
            if message is None:
                raise StreamBroken("claude: stream ended without message_start")
            return Assembled(
                id=message.get("id", ""),
                model=message.get("model", ""),
                content=_encode(blocks),
                stop_reason=delta.get("stop_reason"),
                stop_sequence=delta.get("stop_sequence"),
                usage=_encode(usage),
            )
        elif kind == "error":
            error = data.get("error") or {}
            error_type = str(error.get("type") or "error")
            detail = str(error.get("message") or "")[:300]
            raise StreamBroken(f"claude stream {error_type}: {detail}", error_type)
    raise StreamBroken("claude: stream cut before message_stop")


def _events(body: bytes) -> list[dict[str, Any]]:
    """The JSON data of each event (the `event:` line repeats the data's `type`)."""
    out: list[dict[str, Any]] = []
    for chunk in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = b"\n".join(
            line[5:].lstrip(b" ") for line in chunk.split(b"\n") if line[:5] == b"data:"
        )
        if not data:
            continue
        try:
            event = _decode(data)
        except msgspec.DecodeError as exc:
            raise StreamBroken(f"claude: unreadable stream event ({exc})") from None
        if isinstance(event, dict):
            out.append(event)
    return out


def _add_delta(blocks: list[dict[str, Any]], parts: list[dict[str, list[str]]], data: Any) -> None:
    index, delta = data["index"], data["delta"]
    kind = delta.get("type")
    if kind in _TEXT_DELTAS:
        field, source = _TEXT_DELTAS[kind]
        parts[index].setdefault(field, []).append(delta[source])
    elif kind == "signature_delta":
        blocks[index]["signature"] = delta["signature"]
    elif kind == "citations_delta":
        citations = blocks[index].get("citations") or []
        blocks[index]["citations"] = [*citations, delta["citation"]]
    # A delta of a type not known here is skipped, as the SDK's own accumulator does: the
    # answer is paid for, and failing it would only pay for it again.


def _close_block(
    blocks: list[dict[str, Any]], parts: list[dict[str, list[str]]], index: int
) -> None:
    block = blocks[index]
    for field, pieces in parts[index].items():
        joined = "".join(pieces)
        if field == "input":
            block["input"] = _decode(joined) if joined else {}
        else:
            block[field] = block.get(field, "") + joined
    parts[index] = {}
