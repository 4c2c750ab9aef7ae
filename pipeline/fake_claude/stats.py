"""Counters that let a test prove what the pipeline did to Claude.

`calls_by_request` counts successful calls per request key (see `prompt.request_key`): a
pipeline that pays for each task exactly once shows 1 everywhere. A call whose client hung up
during the latency still counts (Anthropic would bill it) and is also counted in `client_gone`,
its usage also in `usage_client_gone`.

So that a test can tell which request an answer came from (the reply's first word is
`fake-claude:<first 12 hex of the request key>`), each request key maps to its model
(`model_by_request`) and its last user message (`prompt_by_request`, see `prompt_digest`).
`inflight_by_peer` counts calls in flight per client address (`host:port`), and `calls` logs
each successful call (key, peer, start and end time, client gone) so that a test can tie a
paid call to the worker process that made it (the most recent `CALL_LOG_MAX` calls).

`params_seen` counts, per top-level field name, the valid /v1/messages bodies that carried it
(whatever became of them), so a test can show every parameter reached the API; the bodies
themselves are kept only when asked (`record_requests`, see `recorded`). A streamed reply
failed on purpose is no completed call: it counts in `streams_errored` or `streams_cut` only.

The Message Batches API has counters of its own (`BatchStats`, under "batches"): a batch's
requests are no /v1/messages calls, so they stay out of `calls_by_request` and `usage`.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, defaultdict, deque
from typing import Any, NamedTuple

_USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
#: Prompts up to this many characters are recorded as they are; longer ones as a digest.
PROMPT_RECORD_MAX = 512
#: The call log keeps this many of the most recent successful calls.
CALL_LOG_MAX = 100_000


def prompt_digest(text: str) -> str:
    """How `prompt_by_request` records a prompt: the text itself when it is at most
    `PROMPT_RECORD_MAX` characters, else `blake2b:<hex of its UTF-8 bytes>`."""
    if len(text) <= PROMPT_RECORD_MAX:
        return text
    return "blake2b:" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class CallRecord(NamedTuple):
    """One successful call; times are `time.time()` seconds."""

    key: str
    peer: str | None  # the client's "host:port", when the transport told
    began: float
    ended: float
    client_gone: bool
    usage: dict[str, int]


class FakeStats:
    """Mutated only on the server's event loop; `snapshot` gives a JSON-ready copy."""

    def __init__(self, record_requests: int = 0) -> None:
        self.inflight = 0
        self.inflight_by_peer: Counter[str] = Counter()
        self.requests: deque[bytes] = deque(maxlen=record_requests)
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
        self.usage_client_gone: Counter[str] = Counter()
        self.prompt_by_request: dict[str, str] = {}
        self.model_by_request: dict[str, str] = {}
        self.calls: deque[CallRecord] = deque(maxlen=CALL_LOG_MAX)
        self.by_key_family: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.params_seen: Counter[str] = Counter()
        self.streams_errored = 0
        self.streams_cut = 0
        self.batches = BatchStats()
        self.requests.clear()

    def reset(self) -> None:
        """Zero everything, recorded bodies too; requests still in flight stay counted in
        `inflight` (and `inflight_by_peer`)."""
        self._reset_counters()

    def keep_requests(self, count: int) -> None:
        """Record the last `count` bodies from now on (the newest already kept stay)."""
        if count != self.requests.maxlen:
            self.requests = deque(self.requests, maxlen=count)

    def received(self, fields: tuple[str, ...], raw: bytes) -> None:
        """A valid /v1/messages body arrived: count its fields, keep it if recording."""
        self.params_seen.update(fields)
        if self.requests.maxlen:
            self.requests.append(raw)

    def recorded(self) -> list[bytes]:
        """The kept bodies, oldest first, as they were received."""
        return list(self.requests)

    def stream_failed(self, cut: bool) -> None:
        """A streamed reply failed on purpose (cut, or ended by an `error` event)."""
        if cut:
            self.streams_cut += 1
        else:
            self.streams_errored += 1

    def begin(self, peer: str | None = None) -> None:
        self.requests_total += 1
        self.inflight += 1
        if self.inflight > self.inflight_max:
            self.inflight_max = self.inflight
        if peer is not None:
            self.inflight_by_peer[peer] += 1

    def end(self, status: int, key_family: str | None, peer: str | None = None) -> None:
        self.inflight -= 1
        if peer is not None:
            left = self.inflight_by_peer[peer] - 1
            if left > 0:
                self.inflight_by_peer[peer] = left
            else:
                self.inflight_by_peer.pop(peer, None)
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
        *,
        model: str | None = None,
        prompt: str | None = None,
        peer: str | None = None,
        began: float | None = None,
    ) -> None:
        """Count a successful call; `prompt` is the last user message's text."""
        self.calls_by_request[request_key] += 1
        if user_id is not None:
            self.calls_by_user_id[user_id] += 1
        if model is not None:
            self.model_by_request[request_key] = model
        if prompt is not None:
            self.prompt_by_request[request_key] = prompt_digest(prompt)
        now = time.time()
        began = now if began is None else began
        self.calls.append(CallRecord(request_key, peer, began, now, client_gone, dict(usage)))
        if client_gone:
            self.client_gone += 1
        counters = self.by_key_family[key_family]
        counters["succeeded"] += 1
        for name in _USAGE_FIELDS:
            value = usage[name]
            self.usage[name] += value
            counters[name] += value
            if client_gone:
                self.usage_client_gone[name] += value

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
            "usage_client_gone": {name: self.usage_client_gone[name] for name in _USAGE_FIELDS},
            "prompt_by_request": dict(self.prompt_by_request),
            "model_by_request": dict(self.model_by_request),
            "inflight_by_peer": dict(self.inflight_by_peer),
            "calls": [call._asdict() for call in self.calls],
            "by_key_family": {k: dict(v) for k, v in sorted(self.by_key_family.items())},
            "params_seen": dict(sorted(self.params_seen.items())),
            "streams_errored": self.streams_errored,
            "streams_cut": self.streams_cut,
            "batches": self.batches.snapshot(),
        }


#: The four ways a batch request ends, as its result's `type` says.
RESULT_TYPES = ("succeeded", "errored", "canceled", "expired")


class BatchStats:
    """What the Message Batches API received and answered.

    `requests_by_custom_id` counts each custom_id over every batch created, so a test can
    show each task went into exactly one batch; `succeeded_by_request` counts the succeeded
    results per request key (as `calls_by_request` does for /v1/messages), and `usage` sums
    their usage: what Anthropic bills, at the batch price. `calls` counts the HTTP calls per
    endpoint and status ("create 200", "results 400"...). Results are tallied when a batch
    ends, which the fake notices whenever a batch endpoint or the stats are looked at.
    """

    def __init__(self) -> None:
        self.created = 0
        self.requests = 0
        self.requests_by_custom_id: Counter[str] = Counter()
        self.requests_by_batch: dict[str, int] = {}
        self.results_downloads: Counter[str] = Counter()
        self.results: Counter[str] = Counter({name: 0 for name in RESULT_TYPES})
        self.ended = 0
        self.canceled = 0  # batches whose cancel was accepted
        self.deleted = 0
        self.succeeded_by_request: Counter[str] = Counter()
        self.usage: Counter[str] = Counter({name: 0 for name in _USAGE_FIELDS})
        self.usage_by_batch: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.params_seen: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def batch_created(self, batch_id: str, custom_ids: list[str]) -> None:
        self.created += 1
        self.requests += len(custom_ids)
        self.requests_by_custom_id.update(custom_ids)
        self.requests_by_batch[batch_id] = len(custom_ids)

    def result(self, batch_id: str, kind: str, key: str | None, usage: dict[str, int]) -> None:
        """One request of an ending batch got its result; `usage` only when it succeeded."""
        self.results[kind] += 1
        if key is not None:
            self.succeeded_by_request[key] += 1
        if usage:
            per_batch = self.usage_by_batch[batch_id]
            for name in _USAGE_FIELDS:
                self.usage[name] += usage[name]
                per_batch[name] += usage[name]

    def snapshot(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "requests": self.requests,
            "requests_by_custom_id": dict(self.requests_by_custom_id),
            "duplicate_custom_ids": sum(1 for n in self.requests_by_custom_id.values() if n > 1),
            "requests_by_batch": dict(self.requests_by_batch),
            "results_downloads": dict(self.results_downloads),
            "results": {name: self.results[name] for name in RESULT_TYPES},
            "ended": self.ended,
            "canceled": self.canceled,
            "deleted": self.deleted,
            "succeeded_by_request": dict(self.succeeded_by_request),
            "usage": {name: self.usage[name] for name in _USAGE_FIELDS},
            "usage_by_batch": {
                batch: {name: usage[name] for name in _USAGE_FIELDS}
                for batch, usage in self.usage_by_batch.items()
            },
            "params_seen": dict(sorted(self.params_seen.items())),
            "calls": dict(sorted(self.calls.items())),
        }
