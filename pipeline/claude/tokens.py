"""Token estimates made before a call, for reservations that are settled after it.

The rate limiter reserves input tokens per minute and the budget reserves worst-case cost
before Claude has counted anything; both settle to the real `usage` afterwards, so an
estimate only has to be close, never exact. About four characters per token is what the
API's tokenizer gives for English prose (the fake API counts exactly that way); blocks that
are not text (tool definitions, tool calls and results, structured output schemas) are
counted by their JSON. Images and PDFs cannot be measured without decoding them: an image
counts as the most the API bills for one after resizing (about 1,600 tokens), a PDF by its
size (its pages are billed as text plus an image each).
"""

from __future__ import annotations

from typing import Any

import msgspec

from pipeline.claude.params import UNKEYED
from pipeline.claude.request import prompt_chars
from pipeline.claude.task import Request

#: Per-message framing the API adds around each turn (role markers), in tokens.
_PER_MESSAGE_TOKENS = 4
#: The system prompt the API adds to explain tools to the model (300-500 tokens today).
_TOOLS_PREAMBLE_TOKENS = 500
#: An image: the API resizes images to at most ~1.15 megapixels, about 1,600 tokens.
_IMAGE_TOKENS = 1_600
#: A PDF: ~1,500-3,000 tokens a page; a page is ~100 KB of base64, so one token per ~40
#: base64 characters, and a document given by URL counts as a few pages.
_PDF_CHARS_PER_TOKEN = 40
_PDF_BY_URL_TOKENS = 6_000
_encode = msgspec.json.encode


def estimate_input_tokens(request: Request) -> int:
    """Input tokens `request` will probably be billed for."""
    chars = prompt_chars(request)
    tokens = _PER_MESSAGE_TOKENS * len(request.messages)
    for message in request.messages:
        tokens += _blocks_tokens(message["content"])
    params = {k: v for k, v in request.params.items() if k not in UNKEYED}
    if params:
        tokens += len(_encode(params)) // 4
        if params.get("tools"):
            tokens += _TOOLS_PREAMBLE_TOKENS
    return (chars + 3) // 4 + tokens


def _blocks_tokens(content: Any) -> int:
    """Tokens of the blocks that are not text (text is counted by `prompt_chars`)."""
    if not isinstance(content, list):
        return 0
    tokens = 0
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            continue
        if kind == "image":
            tokens += _IMAGE_TOKENS
        elif kind == "document":
            tokens += _document_tokens(block.get("source"))
        elif kind == "tool_result":
            inner = block.get("content")
            tokens += len(inner) // 4 if isinstance(inner, str) else _inner_tokens(inner)
        else:  # tool_use, thinking, search results, anything newer: by its JSON
            tokens += len(_encode(block)) // 4
    return tokens


def _inner_tokens(content: Any) -> int:
    """A tool result's blocks: their text and what `_blocks_tokens` counts."""
    if not isinstance(content, list):
        return 0
    text = sum(
        len(b["text"]) for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)
    )
    return text // 4 + _blocks_tokens(content)


def _document_tokens(source: Any) -> int:
    if not isinstance(source, dict):
        return 0
    data = source.get("data")
    kind = source.get("type")
    if kind == "text" and isinstance(data, str):
        return (len(data) + 3) // 4
    if kind == "base64" and isinstance(data, str):
        return len(data) // _PDF_CHARS_PER_TOKEN + 1
    if kind == "content":
        return _inner_tokens(source.get("content"))
    return _PDF_BY_URL_TOKENS
