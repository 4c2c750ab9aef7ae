"""Token estimates made before a call, for reservations that are settled after it.

The rate limiter reserves input tokens per minute and the budget reserves worst-case cost
before Claude has counted anything; both settle to the real `usage` afterwards, so an
estimate only has to be close, never exact. About four characters per token is what the
API's tokenizer gives for English prose (the fake API counts exactly that way).
"""

from __future__ import annotations

from pipeline.claude.request import prompt_chars
from pipeline.claude.task import Request

#: Per-message framing the API adds around each turn (role markers), in tokens.
_PER_MESSAGE_TOKENS = 4


def estimate_input_tokens(request: Request) -> int:
    """Input tokens `request` will probably be billed for (text only; images not counted)."""
    return (prompt_chars(request) + 3) // 4 + _PER_MESSAGE_TOKENS * len(request.messages)
