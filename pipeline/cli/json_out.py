"""What `--json` prints: typed values, not Redis's strings.

Counts and milliseconds are integers, money is a number (USD), flags are booleans, and JSON
the producer sent (`metadata`, `messages`) is JSON again. A field this module does not know
stays a string, as it was stored (a dead letter's other original fields too: as sent).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pipeline.runtime.dlq import DeadLetter

__all__ = ["dead_letter_json", "result_json", "typed_result"]

#: The result fields (`pipeline.runtime.results.RESULT_FIELDS`) that are not text.
_INTS = frozenset(
    {
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "attempts",
        "latency_ms",
        "call_ms",
    }
)
_NUMBERS = frozenset({"cost_usd"})
_BOOLS = frozenset({"cached"})
#: JSON text: the producer's (metadata, messages, the Messages parameters) and the API's
#: (the answer's content blocks and usage).
_JSON = frozenset(
    {"metadata", "messages", "content", "usage", "tools", "tool_choice", "thinking",
     "stop_sequences", "output_format", "cache_control", "params"}
)  # fmt: skip


def typed_result(found: Mapping[str, str]) -> dict[str, Any]:
    """A result hash with its numbers, flags and metadata typed (an empty number: null)."""
    return {name: _typed(name, value) for name, value in found.items()}


def result_json(task_id: str, found: Mapping[str, str]) -> dict[str, Any]:
    return {"id": task_id, **typed_result(found)}


def _typed(name: str, value: str) -> Any:
    try:
        if name in _INTS:
            return int(value) if value else None
        if name in _NUMBERS:
            return float(value) if value else None
    except ValueError:
        return value
    if name in _BOOLS:
        return {"true": True, "false": False}.get(value, value)
    if name in _JSON and value:
        return _maybe_json(value)
    return value


def _maybe_json(value: str) -> Any:
    """JSON objects and arrays decoded; anything else (cut, not JSON) as it was."""
    if value[:1] not in "[{":
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def dead_letter_json(letter: DeadLetter, now_ms: int, *, full: bool = False) -> dict[str, Any]:
    """One dead letter; `full` adds the task's original fields (JSON values decoded)."""
    data: dict[str, Any] = {
        "dlq_id": letter.dlq_id,
        "task_id": letter.task_id,
        "stage": letter.stage,
        "stream": letter.stream,
        "error": letter.error,
        "deliveries": letter.deliveries,
        "attempts": letter.attempts,
        "failed_at_ms": letter.failed_at_ms or None,
        "age_s": round(max(0, now_ms - letter.failed_at_ms) / 1000, 3)
        if letter.failed_at_ms
        else None,
    }
    if letter.partition is not None:  # with partitions: whose DLQ holds it
        data["partition"] = letter.partition
    if full:
        data["traceparent"] = letter.traceparent or None
        data["result_kept"] = letter.result_kept
        data["size"] = letter.size
        data["fields"] = {k: _maybe_json(v) if k in _JSON else v for k, v in letter.fields.items()}
    return data
