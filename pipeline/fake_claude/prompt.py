"""Read a Messages API body: validate it, count its tokens, find its cache breakpoints, key it.

Token counts are a cheap, deterministic estimate (ceil(utf-8 bytes / 4) per block), additive
over blocks so that the tokens of a cached prefix are simply the sum up to its breakpoint.
Prefixes are walked in Anthropic's cache order: tools, then system, then messages.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .params import Generation, InvalidRequest, check_fields, parse_generation

MAX_BREAKPOINTS = 4
#: Fields that do not change what the model would say, left out of the request key.
UNKEYED_FIELDS = frozenset({"metadata", "stream"})

_encode = msgspec.json.Encoder(order="sorted").encode
_decode = msgspec.json.Decoder().decode


@dataclass(slots=True)
class Breakpoint:
    """A block with `cache_control`: the digest and token count of the prefix ending there."""

    digest: bytes
    tokens: int
    ttl: str  # "5m" or "1h"


@dataclass(slots=True)
class ParsedRequest:
    """What the server needs from a valid body."""

    model: str
    max_tokens: int
    stream: bool
    user_id: str | None
    input_tokens: int
    key: str
    breakpoints: list[Breakpoint] = field(default_factory=list)
    last_user_text: str | None = None  # for the stats: which prompt a reply answered
    generation: Generation = field(default_factory=Generation)
    fields: tuple[str, ...] = ()  # the body's top-level field names, as sent


def count_tokens(text: str) -> int:
    """ceil(utf-8 bytes / 4): close enough to a tokenizer for rate limits and usage."""
    return (len(text.encode()) + 3) // 4


def request_key(body: Mapping[str, Any]) -> str:
    """Hex key of a request: its canonical JSON without `metadata` and `stream`.

    Two bodies with the same model, system, messages, max_tokens, temperature, tools...
    get the same key whatever their key order, so the stats can count calls per request.
    """
    canonical = {k: v for k, v in body.items() if k not in UNKEYED_FIELDS}
    return hashlib.blake2b(_encode(canonical), digest_size=16).hexdigest()


def parse_request(raw: bytes, *, count_only: bool = False) -> ParsedRequest:
    """Validate a /v1/messages (or, with `count_only`, a count_tokens) body."""
    try:
        body = _decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"There was an error parsing the body of your request: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return parse_body(body, count_only=count_only)


def parse_body(body: dict[str, Any], *, count_only: bool = False) -> ParsedRequest:
    """Validate a decoded body (a batch request's `params` come this way)."""
    if not count_only:
        check_fields(body)

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: Field required" if model is None else "model: invalid model")
    max_tokens = body.get("max_tokens", None if not count_only else 1)
    if max_tokens is None:
        raise InvalidRequest("max_tokens: Field required")
    if type(max_tokens) is not int:
        raise InvalidRequest("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise InvalidRequest("max_tokens: Input should be greater than or equal to 1")
    stream = body.get("stream", False)
    if type(stream) is not bool:
        raise InvalidRequest("stream: Input should be a valid boolean")
    _check_sampling(body)
    user_id = _user_id(body.get("metadata"))

    walker = _Walker()
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise InvalidRequest("tools: Input should be a valid list")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise InvalidRequest(f"tools.{i}: Input should be a valid dictionary")
            walker.block(b"T", tool, f"tools.{i}")
    _walk_system(walker, body.get("system"))
    _walk_messages(walker, body.get("messages"))
    top_level = body.get("cache_control")
    if top_level is not None:
        walker.mark_last(top_level)
    generation = parse_generation(body, None if count_only else max_tokens)
    return ParsedRequest(
        model=model,
        max_tokens=max_tokens,
        stream=stream,
        user_id=user_id,
        input_tokens=walker.tokens + _format_tokens(generation),
        key=request_key(body),
        breakpoints=walker.breakpoints(model),
        last_user_text=last_user_text(body["messages"]),
        generation=generation,
        fields=tuple(body),
    )


def _format_tokens(generation: Generation) -> int:
    """A structured-output schema is read by the model too (counted after the messages, so
    it never falls inside a cached prefix)."""
    schema = generation.output_schema
    return 0 if schema is None else (len(_encode(schema)) + 3) // 4


def last_user_text(messages: list[Any]) -> str | None:
    """The text of the last user message (its text blocks joined by newlines); None if no
    message is the user's. Takes messages `parse_request` has already checked."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        return "\n".join(
            block["text"]
            for block in content
            if block.get("type") == "text" and isinstance(block.get("text"), str)
        )
    return None


def _check_sampling(body: dict[str, Any]) -> None:
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is None:
            continue
        if type(value) not in (int, float):
            raise InvalidRequest(f"{name}: Input should be a valid number")
        if not 0.0 <= value <= 1.0:
            raise InvalidRequest(f"{name}: Input should be between 0 and 1")
    top_k = body.get("top_k")
    if top_k is not None and (type(top_k) is not int or top_k < 0):
        raise InvalidRequest("top_k: Input should be a non-negative integer")


def _user_id(metadata: object) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidRequest("metadata: Input should be a valid dictionary")
    user_id = metadata.get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        raise InvalidRequest("metadata.user_id: Input should be a valid string")
    return user_id


def _walk_system(walker: _Walker, system: object) -> None:
    if system is None:
        return
    if isinstance(system, str):
        walker.text(b"S", system)
        return
    if not isinstance(system, list):
        raise InvalidRequest("system: Input should be a valid string or list of text blocks")
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise InvalidRequest(f"system.{i}: Input should be a text block")
        walker.block(b"S", block, f"system.{i}")


def _walk_messages(walker: _Walker, messages: object) -> None:
    if messages is None:
        raise InvalidRequest("messages: Field required")
    if not isinstance(messages, list):
        raise InvalidRequest("messages: Input should be a valid list")
    if not messages:
        raise InvalidRequest("messages: at least one message is required")
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages.{i}: Input should be a valid dictionary")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise InvalidRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        marker = b"U" if role == "user" else b"A"
        content = message.get("content")
        if isinstance(content, str):
            empty = not content
            walker.text(marker, content)
        elif isinstance(content, list):
            empty = not content
            for j, block in enumerate(content):
                if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                    raise InvalidRequest(f"messages.{i}.content.{j}: Input should be a block")
                walker.block(marker, block, f"messages.{i}.content.{j}")
        else:
            raise InvalidRequest(
                f"messages.{i}.content: Input should be a valid string or list of blocks"
            )
        if empty and not (i == last and role == "assistant"):
            raise InvalidRequest(
                f"messages.{i}: all messages must have non-empty content except for the "
                "optional final assistant message"
            )


class _Walker:
    """Sums block tokens in cache order and remembers where the breakpoints fall."""

    __slots__ = ("_marks", "_units", "tokens")

    def __init__(self) -> None:
        self.tokens = 0
        self._units: list[bytes] = []
        self._marks: list[tuple[int, int, str]] = []  # (units so far, tokens so far, ttl)

    def text(self, marker: bytes, text: str) -> None:
        data = text.encode()
        self.tokens += (len(data) + 3) // 4
        self._units.append(marker + data)

    def block(self, marker: bytes, block: dict[str, Any], where: str) -> None:
        cache_control = block.get("cache_control")
        if block.get("type") == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(f"{where}.text: Input should be a valid string")
            if not text:
                raise InvalidRequest(f"{where}.text: text content blocks must be non-empty")
            self.text(marker, text)
        else:
            plain = (
                block
                if cache_control is None
                else {k: v for k, v in block.items() if k != "cache_control"}
            )
            data = _encode(plain)
            self.tokens += (len(data) + 3) // 4
            self._units.append(marker + data)
        if cache_control is not None:
            self._mark(cache_control, where)

    def _mark(self, cache_control: object, where: str) -> None:
        self._marks.append(
            (len(self._units), self.tokens, _ttl(cache_control, f"{where}.cache_control"))
        )
        self._check_count()

    def _check_count(self) -> None:
        if len(self._marks) > MAX_BREAKPOINTS:
            raise InvalidRequest(
                f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
                f"Found {len(self._marks)}."
            )

    def mark_last(self, cache_control: object) -> None:
        """Top-level `cache_control`: a breakpoint on the last block, unless it has one."""
        if self._marks and self._marks[-1][0] == len(self._units):
            _ttl(cache_control, "cache_control")
        else:
            self._marks.append(
                (len(self._units), self.tokens, _ttl(cache_control, "cache_control"))
            )
            self._check_count()

    def breakpoints(self, model: str) -> list[Breakpoint]:
        """Digest each cached prefix; only paid for by requests that use caching."""
        if not self._marks:
            return []
        hasher = hashlib.blake2b(model.encode(), digest_size=16)
        out: list[Breakpoint] = []
        done = 0
        for units, tokens, ttl in self._marks:
            for unit in self._units[done:units]:
                hasher.update(len(unit).to_bytes(8, "little"))
                hasher.update(unit)
            done = units
            out.append(Breakpoint(hasher.copy().digest(), tokens, ttl))
        return out


def _ttl(cache_control: object, path: str) -> str:
    """The TTL of a valid `cache_control` ("5m" unless it says "1h")."""
    if not isinstance(cache_control, dict) or cache_control.get("type") != "ephemeral":
        raise InvalidRequest(f"{path}: Input should be {{'type': 'ephemeral'}}")
    ttl = cache_control.get("ttl", "5m")
    if ttl not in ("5m", "1h"):
        raise InvalidRequest(f"{path}.ttl: Input should be '5m' or '1h'")
    return str(ttl)
