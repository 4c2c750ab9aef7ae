"""The result hash every task ends with (DESIGN: Result), and the task's own result TTL."""

from __future__ import annotations

from collections.abc import Mapping

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
    "error",
    "attempts",
    "latency_ms",
    "call_ms",
    "trace_id",
    "metadata",
)
MAX_TTL_S = 30 * 24 * 3600


def result_ttl(fields: Mapping[str, str], default_s: int) -> int:
    """The task's `ttl` field if it is a sane positive integer, else the default."""
    raw = fields.get("ttl")
    if raw is None:
        return default_s
    try:
        ttl = int(raw)
    except ValueError:
        return default_s
    return ttl if 0 < ttl <= MAX_TTL_S else default_s


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
        }
    )
    out.update({k: _text(v) for k, v in values.items() if v is not None})
    return out


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
