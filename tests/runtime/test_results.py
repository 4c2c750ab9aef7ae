"""The result hash has one owner, `pipeline.runtime.results`: it builds `completed` (the store's)
and `failed` (the runtime's, for any app) hashes and resolves their TTL, so the two kinds never
drift apart in fields, formatting or lifetime."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from pipeline.runtime.results import (
    MAX_TTL_S,
    RESULT_FIELDS,
    completed_result,
    failed_result,
    result_ttl,
)
from pipeline.runtime.wire import Envelope

ROOT = Path(__file__).resolve().parents[2]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def envelope(age_ms: int, traceparent: str | None = TRACEPARENT) -> Envelope:
    now = int(time.time() * 1000)
    return Envelope(1, "t1", {}, 1, now - age_ms, now, traceparent)


def test_a_completed_result_has_every_field_its_latency_and_trace() -> None:
    values = {"output": "spam", "model": "m", "input_tokens": 12, "cached": False}
    result = completed_result(envelope(1500), **values, attempts=1, call_ms=800, metadata="{}")
    assert list(result) == list(RESULT_FIELDS)
    assert 1500 <= int(result.pop("latency_ms")) < 10_000
    assert result == {
        "status": "completed", "output": "spam", "model": "m", "input_tokens": "12",
        "output_tokens": "0", "cache_read_input_tokens": "0", "cache_creation_input_tokens": "0",
        "cost_usd": "0", "cached": "false", "stop_reason": "", "error": "", "attempts": "1",
        "call_ms": "800", "trace_id": TRACE_ID, "metadata": "{}", "stop_sequence": "",
        "content": "[]", "usage": "{}", "message_id": "", "request_id": "",
    }  # fmt: skip


def test_a_failed_result_has_every_field_its_latency_and_trace() -> None:
    result = failed_result("bad input", attempts=2, fields={"metadata": '{"b": 2}'},
                           traceparent=TRACEPARENT, origin_ms=envelope(2000).origin_ms)  # fmt: skip
    assert list(result) == list(RESULT_FIELDS)
    assert 2000 <= int(result.pop("latency_ms")) < 10_000
    assert result == {
        "status": "failed", "output": "", "model": "", "input_tokens": "0",
        "output_tokens": "0", "cache_read_input_tokens": "0", "cache_creation_input_tokens": "0",
        "cost_usd": "0", "cached": "false", "stop_reason": "", "error": "bad input",
        "attempts": "2", "call_ms": "0", "trace_id": TRACE_ID, "metadata": '{"b": 2}',
        "stop_sequence": "", "content": "[]", "usage": "{}", "message_id": "", "request_id": "",
    }  # fmt: skip


def test_a_failed_result_without_an_entry_or_metadata() -> None:
    """An entry that never decoded has no origin time (latency 0) and no trace; a handler's
    `Fail(result=...)` adds its own fields over the built ones."""
    result = failed_result("undecodable", attempts=1, fields={"metadata": ""}, traceparent=None,
                           origin_ms=None, extra={"model": "m", "output": "part"})  # fmt: skip
    assert (result["latency_ms"], result["trace_id"], result["metadata"]) == ("0", "", "{}")
    assert (result["model"], result["output"]) == ("m", "part")


@pytest.mark.parametrize(
    ("fields", "requested", "ttl"),
    [
        ({}, None, 3600),
        ({"ttl": "120"}, None, 120),
        ({"ttl": "120"}, 30, 30),  # an app's explicit TTL wins
        ({"ttl": "0"}, None, 3600),
        ({"ttl": "soon"}, None, 3600),
        ({"ttl": str(MAX_TTL_S + 1)}, None, 3600),
    ],
)
def test_the_result_ttl(fields: dict[str, str], requested: int | None, ttl: int) -> None:
    assert result_ttl(fields, 3600, requested) == ttl


def test_only_the_results_module_builds_a_result_hash_or_resolves_its_ttl() -> None:
    """One owner: the store and the runtime ask `pipeline.runtime.results`; nobody else fills
    a result hash (`make_result`) or works out its TTL (`result_ttl`) on their own."""
    owner = ROOT / "pipeline" / "runtime" / "results.py"
    builds, ttls = [], []
    for path in [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").rglob("*.py")]:
        if path == owner:
            continue
        text = path.read_text()
        rel = str(path.relative_to(ROOT))
        builds += [rel] * len(re.findall(r"\bmake_result\(", text))
        ttls += [rel] * len(re.findall(r"\bresult_ttl\(", text))
    assert builds == []
    assert ttls == ["pipeline/runtime/planner.py"], "resolved once, where every result is planned"
