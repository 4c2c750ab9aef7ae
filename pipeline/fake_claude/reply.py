"""Deterministic replies: the same request key always gives the same words and token count.

One word is one output token. The first word names the request key, so a stored output can be
traced back to the request that produced it.
"""

from __future__ import annotations

import random

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
