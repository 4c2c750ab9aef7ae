"""An answer's content blocks: kept whole, stored compactly, joined into text.

The result keeps the answer's full `content` array (text, tool_use, thinking, citations, server
tool results, and block types not yet invented) next to `output`, its text joined. Most answers
are one plain text block, which would be the output a second time in every task record,
cache entry and flight; for those `Answer.content` stays "" and the array is rebuilt from the
output when the result is written (`blocks_json`).
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["blocks_json", "split_content"]


class _PlainText(msgspec.Struct, forbid_unknown_fields=True):
    """A text block with nothing but its text (no citations, no field we do not know)."""

    type: Literal["text"]
    text: str
    citations: None = None


class _Block(msgspec.Struct):
    type: str
    text: str = ""


_plain = msgspec.json.Decoder(list[_PlainText]).decode
_blocks = msgspec.json.Decoder(list[_Block]).decode
_encode = msgspec.json.encode


def split_content(content: bytes) -> tuple[str, str]:
    """(`content` as an Answer keeps it, the text of its text blocks) for the API's
    content array (JSON). A single plain text block is kept as "" (see the module doc).

    Raises:
        msgspec.DecodeError, msgspec.ValidationError: not an array of content blocks.
    """
    try:
        plain = _plain(content)
    except msgspec.ValidationError:
        pass
    else:
        if len(plain) == 1:
            return "", plain[0].text
    blocks = _blocks(content)
    return content.decode(), "".join(b.text for b in blocks if b.type == "text")


def blocks_json(content: str, output: str) -> str:
    """The full content array as JSON text, from what an Answer keeps."""
    if content:
        return content
    return _encode([{"type": "text", "text": output}]).decode()
