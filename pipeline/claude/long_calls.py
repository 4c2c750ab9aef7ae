"""Which calls are streamed, and how long a call may take (shutdown waits that long for it).

Anthropic asks that a call which may run past ~10 minutes (long outputs, extended thinking)
be streamed: proxies and load balancers cut a connection idle that long, and the paid answer
is lost with it. Apart from that, streaming changes nothing a user sees in the result.
"""

from __future__ import annotations

from pipeline.claude.params import thinks
from pipeline.claude.settings import ClaudeSettings
from pipeline.claude.task import Routed

__all__ = ["call_timeout_s", "streams"]


def streams(routed: Routed, settings: ClaudeSettings) -> bool:
    """Whether `routed` is sent as a stream: a large `max_tokens`
    (`claude.stream_from_max_tokens`), or extended thinking."""
    return routed.max_tokens >= settings.stream_from_max_tokens or thinks(routed.request.params)


def call_timeout_s(routed: Routed, settings: ClaudeSettings) -> float:
    """The longest `routed`'s call may take: `claude.stream_timeout_s` when streamed, else
    `claude.timeout_s`."""
    return settings.stream_timeout_s if streams(routed, settings) else settings.timeout_s
