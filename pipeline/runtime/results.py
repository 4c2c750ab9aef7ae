"""The result hash every task ends with (DESIGN: Result), and the task's own result TTL.

Its one owner: the `completed` hash an app's last stage returns (`completed_result`) and the
`failed` one the runtime writes for any app's dead letters (`failed_result`) are both built
here, on one layout with one formatting, and the runtime resolves every result's TTL here
(`result_ttl`) as it writes it, so the kinds never drift apart.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from pipeline.runtime.traceparent import trace_id_of
from pipeline.runtime.wire import Envelope

#: Every result carries these fields, completed or failed, so readers never miss a key.
RESULT_FIELDS = (
    "status",
    "output",
    "model",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "cost_usd",
    "cached",
    "stop_reason",
    "stop_sequence",
    "content",
    "usage",
    "message_id",
    "request_id",
    "error",
    "attempts",
    "latency_ms",
    "call_ms",
    "trace_id",
    "metadata",
)
MAX_TTL_S = 30 * 24 * 3600


def result_ttl(fields: Mapping[str, str], default_s: int, requested_s: int | None = None) -> int:
    """How long a task's result lives: what the app asked for (`Complete.ttl_s`), else the
    task's `ttl` field if it is a sane positive integer, else the default."""
    if requested_s:
        return requested_s
    raw = fields.get("ttl")
    if raw is None:
        return default_s
    try:
        ttl = int(raw)
    except ValueError:
        return default_s
    return ttl if 0 < ttl <= MAX_TTL_S else default_s


def completed_result(envelope: Envelope, **values: object) -> dict[str, str]:
    """A `completed` hash for the task in `envelope`: the app's `values` (output, model,
    usage, cost...) and what every result tells of its task (latency, trace id)."""
    return _result("completed", envelope.origin_ms, envelope.traceparent, values)


def failed_result(
    error: str,
    *,
    attempts: int,
    fields: Mapping[str, str],
    traceparent: str | None,
    origin_ms: int | None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A `failed` hash: the reason, the producer's metadata back, and what a handler's
    `Fail(result=...)` adds. `origin_ms` None: the entry never decoded (latency 0)."""
    values = {"error": error, "attempts": attempts, "metadata": fields.get("metadata") or "{}"}
    result = _result("failed", origin_ms, traceparent, values)
    result.update(extra or {})
    return result


def make_result(status: str, **values: object) -> dict[str, str]:
    """A full result hash: every field present, as strings."""
    out = dict.fromkeys(RESULT_FIELDS, "")
    out.update(
        {
            "status": status,
            "cached": "false",
            "attempts": "0",
            "cost_usd": "0",
            "input_tokens": "0",
            "output_tokens": "0",
            "cache_read_input_tokens": "0",
            "cache_creation_input_tokens": "0",
            "metadata": "{}",
            "call_ms": "0",
            "content": "[]",
            "usage": "{}",
        }
    )
    out.update({k: _text(v) for k, v in values.items() if v is not None})
    return out


def _result(
    status: str, origin_ms: int | None, traceparent: str | None, values: Mapping[str, object]
) -> dict[str, str]:
    now_ms = int(time.time() * 1000)
    latency_ms = 0 if origin_ms is None else max(0, now_ms - origin_ms)
    return make_result(status, latency_ms=latency_ms, trace_id=trace_id_of(traceparent), **values)


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
