"""Deterministic replies: the same request key always gives the same words and token count.

One word is one output token. The first word names the request key, so a stored output can be
traced back to the request that produced it. `build_reply` adds what the request's generation
parameters ask for (thinking, tool calls, structured output, stop sequences); a request
without them gets the single text block it always got.
"""

from __future__ import annotations

import base64
import hashlib
import random
from dataclasses import dataclass
from typing import Any

import msgspec

from .cache import CachePlan
from .params import Generation
from .prompt import count_tokens
from .schema import instance

_WORDS = (
    "the", "pipeline", "stream", "task", "worker", "entry", "reply", "token", "budget", "retry",
    "bucket", "minute", "queue", "result", "stage", "batch", "claim", "ack", "lease", "model",
    "prompt", "cache", "usage", "limit", "window", "event", "record", "ledger", "commit",
    "replay", "order", "shard", "group", "consumer", "producer", "delivery", "idempotent",
    "exactly", "once", "latency", "backoff", "jitter", "signal", "drain", "state", "metric",
    "trace", "span", "clock", "offset", "cursor",
)  # fmt: skip


def planned_output_tokens(key: str, low: int, high: int) -> int:
    """How many tokens the model 'wants' to say for this request, in [low, high]."""
    return low + int(key[:12], 16) % (high - low + 1)


def reply_text(key: str, tokens: int) -> str:
    """`tokens` words: a `fake-claude:<key prefix>` tag, then words drawn from the key."""
    if tokens <= 0:
        return ""
    rng = random.Random(int(key, 16))
    words = rng.choices(_WORDS, k=tokens - 1)
    return " ".join([f"fake-claude:{key[:12]}", *words])


#: A tool call is preceded by this many words at most (3..12 by request key).
_PREAMBLE_WORDS = (3, 12)


@dataclass(slots=True)
class Reply:
    """The assistant turn of one request: its blocks, why it stopped, what it cost."""

    content: list[dict[str, Any]]
    stop_reason: str
    stop_sequence: str | None
    output_tokens: int


def build_reply(key: str, gen: Generation, max_tokens: int, low: int, high: int) -> Reply:
    """The blocks a request gets, in the API's order: thinking, text, tool_use.

    Every block counts toward `max_tokens`; the block that reaches it is cut (a text) or
    left out (a tool call, whose input would not be whole), with `stop_reason` "max_tokens".
    Stop sequences end the text where the first of them is completed. Server tools
    (`web_search_...`) are accepted but never called: a request with only those gets text.
    """
    left = max_tokens
    content: list[dict[str, Any]] = []
    if gen.thinking is not None:
        thought = thinking_tokens(key, low, high, gen.thinking_budget)
        if thought >= left:
            content.append(thinking_block(key, left, gen.thinking_omitted))
            return Reply(content, "max_tokens", None, max_tokens)
        content.append(thinking_block(key, thought, gen.thinking_omitted))
        left -= thought

    tool = gen.called_tool()
    wanted = planned_output_tokens(key, low, high)
    text: _Text | None = None
    if tool is not None and not gen.forces_tool:
        text = _Text.words(key, min(wanted, _preamble_words(key)))
    elif tool is None and gen.output_schema is not None:
        text = _Text.json(instance(gen.output_schema, f"{key}:output"))
    elif tool is None:
        text = _Text.words(key, wanted)
    if text is not None:
        truncated = text.fit(left)
        stop = text.stop_at(gen.stop_sequences)
        if text.text:
            content.append({"type": "text", "text": text.text})
        left -= text.tokens
        if stop is not None:
            return Reply(content, "stop_sequence", stop, max_tokens - left)
        if truncated:
            return Reply(content, "max_tokens", None, max_tokens)
    if tool is None:
        return Reply(content, "end_turn", None, max_tokens - left)
    block, tokens = tool_use_block(key, *tool)
    if tokens > left:
        return Reply(content, "max_tokens", None, max_tokens)
    content.append(block)
    return Reply(content, "tool_use", None, max_tokens - left + tokens)


def billed_usage(plan: CachePlan, output_tokens: int) -> dict[str, int]:
    """The four token counts of a call, as the stats sum them."""
    return {
        "input_tokens": plan.input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": plan.cache_creation_input_tokens,
        "cache_read_input_tokens": plan.cache_read_input_tokens,
    }


def message_object(
    message_id: str, model: str, reply: Reply, plan: CachePlan, service_tier: str
) -> dict[str, Any]:
    """The Message a call answers with (a batch's succeeded result carries the same)."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": reply.content,
        "stop_reason": reply.stop_reason,
        "stop_sequence": reply.stop_sequence,
        "usage": {
            **billed_usage(plan, reply.output_tokens),
            "cache_creation": {
                "ephemeral_5m_input_tokens": plan.cache_creation_5m,
                "ephemeral_1h_input_tokens": plan.cache_creation_1h,
            },
            "service_tier": service_tier,
        },
    }


def thinking_tokens(key: str, low: int, high: int, budget: int | None) -> int:
    """How long the model 'thinks' about this request, in [low, high], within the budget."""
    tokens = low + int(key[12:24], 16) % (high - low + 1)
    return tokens if budget is None else min(tokens, budget)


def thinking_block(key: str, tokens: int, omitted: bool) -> dict[str, Any]:
    """`tokens` words of thought (none shown when `display` is "omitted"), and a signature
    that stands for them: base64 of a digest, as opaque as the real one."""
    rng = random.Random(f"{key}:thinking")
    thinking = "" if omitted else " ".join(rng.choices(_WORDS, k=tokens))
    digest = hashlib.blake2b(f"{key}:thinking:{tokens}".encode(), digest_size=64).digest()
    return {
        "type": "thinking",
        "thinking": thinking,
        "signature": base64.b64encode(digest).decode(),
    }


def tool_use_block(key: str, name: str, schema: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A call of tool `name` with an input made from its schema, and its output tokens."""
    tool_input = instance(schema, f"{key}:tool:{name}")
    encoded = msgspec.json.encode(tool_input)
    use_id = hashlib.blake2b(f"{key}:{name}".encode(), digest_size=12).hexdigest()
    block = {"type": "tool_use", "id": f"toolu_fake{use_id}", "name": name, "input": tool_input}
    return block, count_tokens(name) + (len(encoded) + 3) // 4


def _preamble_words(key: str) -> int:
    low, high = _PREAMBLE_WORDS
    return low + int(key[24:26], 16) % (high - low + 1)


@dataclass(slots=True)
class _Text:
    """A text block being shaped: plain words (a word a token) or JSON (bytes / 4)."""

    key: str
    text: str
    is_json: bool
    tokens: int

    @classmethod
    def words(cls, key: str, tokens: int) -> _Text:
        return cls(key, reply_text(key, tokens), False, tokens)

    @classmethod
    def json(cls, value: Any) -> _Text:
        text = msgspec.json.encode(value).decode()
        return cls("", text, True, count_tokens(text))

    def fit(self, limit: int) -> bool:
        """Cut to at most `limit` tokens; True when something was cut."""
        if self.tokens <= limit:
            return False
        if self.is_json:
            self.text = self.text.encode()[: 4 * limit].decode(errors="ignore")
            self.tokens = count_tokens(self.text)
        else:
            self.text, self.tokens = reply_text(self.key, limit), limit
        return True

    def stop_at(self, sequences: tuple[str, ...]) -> str | None:
        """End before the stop sequence completed first; returns it (None if none occurs)."""
        best: tuple[int, int, str] | None = None
        for seq in sequences:
            at = self.text.find(seq)
            if at >= 0 and (best is None or (at + len(seq), at) < best[:2]):
                best = (at + len(seq), at, seq)
        if best is None:
            return None
        self.text = self.text[: best[1]]
        self.tokens = count_tokens(self.text) if self.is_json else len(self.text.split())
        return best[2]
