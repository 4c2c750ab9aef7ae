"""Counters that let a test prove what the pipeline did to Claude.

`calls_by_request` counts successful calls per request key (see `prompt.request_key`): a
pipeline that pays for each task exactly once shows 1 everywhere. A call whose client hung up
during the latency still counts (Anthropic would bill it) and is also counted in `client_gone`.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Any

_USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


class FakeStats:
    """Mutated only on the server's event loop; `snapshot` gives a JSON-ready copy."""

    def __init__(self) -> None:
        self.inflight = 0
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.started_at = time.time()
        self.requests_total = 0
        self.inflight_max = self.inflight
        self.client_gone = 0
        self.by_status: Counter[int] = Counter()
        self.calls_by_request: Counter[str] = Counter()
        self.calls_by_user_id: Counter[str] = Counter()
        self.usage: Counter[str] = Counter()
        self.by_key_family: defaultdict[str, Counter[str]] = defaultdict(Counter)

    def reset(self) -> None:
        """Zero everything; requests still in flight stay counted in `inflight`."""
        self._reset_counters()

    def begin(self) -> None:
        self.requests_total += 1
        self.inflight += 1
        if self.inflight > self.inflight_max:
            self.inflight_max = self.inflight

    def end(self, status: int, key_family: str | None) -> None:
        self.inflight -= 1
        self.by_status[status] += 1
        if key_family is not None:
            counters = self.by_key_family[key_family]
            counters["requests"] += 1
            counters[f"status_{status}"] += 1

    def success(
        self,
        request_key: str,
        user_id: str | None,
        key_family: str,
        usage: dict[str, int],
        client_gone: bool,
    ) -> None:
        self.calls_by_request[request_key] += 1
        if user_id is not None:
            self.calls_by_user_id[user_id] += 1
        if client_gone:
            self.client_gone += 1
        counters = self.by_key_family[key_family]
        counters["succeeded"] += 1
        for name in _USAGE_FIELDS:
            value = usage[name]
            self.usage[name] += value
            counters[name] += value

    def snapshot(self) -> dict[str, Any]:
        calls = self.calls_by_request
        return {
            "started_at": self.started_at,
            "requests_total": self.requests_total,
            "by_status": {str(code): n for code, n in sorted(self.by_status.items())},
            "succeeded": sum(calls.values()),
            "distinct_requests": len(calls),
            "duplicate_requests": sum(1 for n in calls.values() if n > 1),
            "max_calls_per_request": max(calls.values(), default=0),
            "calls_by_request": dict(calls),
            "calls_by_user_id": dict(self.calls_by_user_id),
            "inflight": self.inflight,
            "inflight_max": self.inflight_max,
            "client_gone": self.client_gone,
            "usage": {name: self.usage[name] for name in _USAGE_FIELDS},
            "by_key_family": {k: dict(v) for k, v in sorted(self.by_key_family.items())},
        }
