"""A wire-compatible fake of the Anthropic Messages API, for tests and demos without Claude.

The real `anthropic` SDK talks to it through `base_url`. Replies are deterministic per request,
and follow what the request asks for: tool calls, thinking, structured output, stop sequences,
streamed or not. Auth failures, rate limits (token buckets per key and model family), 529/500
faults, streams failing halfway and latency are configurable, at start (`FakeClaudeConfig`) or
at runtime (POST /_fake/config); GET /_fake/stats counts the calls so a test can prove each task
reached Claude exactly once and each parameter arrived (GET /_fake/requests: the bodies).
The Message Batches API (/v1/messages/batches...) runs batches on the same injectable clock.
"""

from __future__ import annotations

from .config import FakeClaudeConfig, RateLimits
from .limits import RateLimiter, TokenBucket, model_family
from .prompt import count_tokens, request_key
from .runner import (
    FakeClaudeServer,
    raise_open_files_limit,
    run_fake_claude_in_thread,
    run_forever,
    start_fake_claude,
)
from .server import FakeClaudeApp

__all__ = [
    "FakeClaudeApp",
    "FakeClaudeConfig",
    "FakeClaudeServer",
    "RateLimiter",
    "RateLimits",
    "TokenBucket",
    "count_tokens",
    "model_family",
    "raise_open_files_limit",
    "request_key",
    "run_fake_claude_in_thread",
    "run_forever",
    "start_fake_claude",
]
