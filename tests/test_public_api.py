"""Each package's public API is its `__all__`, pinned here: adding or dropping a name is a
decision made in this file, not by accident. Stages use only those public names."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_RUNTIME_API = [
    "App", "AuthError", "Backpressure", "Complete", "ConfigError", "Defer", "Drop", "Fail",
    "Forward", "Handler", "HandlerFactory", "Hook", "InvalidTask", "Keys", "Message",
    "Outcome", "PermanentError", "PipelineError", "RedisUnavailable", "Reject", "Retry",
    "Services", "Stage", "TransientError",
]  # fmt: skip

_RUNTIME_MORE = [
    "BaseSettings", "completed_result", "failed_result", "load", "make_result", "result_ttl",
    "trace_id_of",
]  # fmt: skip
_CLAUDE_API = [
    "Admission", "Answer", "BatchLane", "batched", "make_batch_client", "Budget", "Caller",
    "Claim", "ClaimState", "Flights", "LeadLost",
    "Ledger", "Request", "Reservation", "ResponseCache", "Route", "Routed", "Settings",
    "TaskRecords", "Usage", "WIRE_FIELDS", "call_timeout_s", "held_in_batches",
    "load_settings", "micro_usd",
    "parse_request", "prompt_chars", "route", "route_to", "streams", "unknown_model", "usd",
    "validate_request",
]  # fmt: skip

_CLIENT_API = [
    "BATCH_SIZE", "Backpressure", "Client", "ConfigError", "InvalidTask", "RedisUnavailable",
    "SubmitFailed", "WIRE_FIELDS", "task_fields", "with_id",
]  # fmt: skip

PUBLIC: dict[str, list[str]] = {
    # What an application's stages import: the runtime's API and the pipeline's settings.
    "pipeline": [*_RUNTIME_API, "Settings", "load_settings"],
    "pipeline.runtime": [*_RUNTIME_API, *_RUNTIME_MORE],
    "pipeline.claude": _CLAUDE_API,
    "observability": ["producer_tracing", "require_tracing", "tracing_enabled"],
    "pipeline.client": _CLIENT_API,
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_all_is_pinned_and_every_name_resolves(package: str) -> None:
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(PUBLIC[package])
    assert len(set(module.__all__)) == len(module.__all__), "a name listed twice"
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def test_the_facade_and_the_runtime_name_the_same_objects() -> None:
    import pipeline
    import pipeline.runtime

    for name in _RUNTIME_API:
        assert getattr(pipeline, name) is getattr(pipeline.runtime, name), name


def test_stages_import_only_public_names() -> None:
    wrong = []
    for path in sorted((ROOT / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                wrong += [f"{path.name}: import {a.name}" for a in node.names
                          if a.name.split(".")[0] == "pipeline"]  # fmt: skip
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                top = node.module.split(".")[0]
                if top != "pipeline":
                    continue
                if node.module not in PUBLIC:
                    wrong.append(f"{path.name}: from {node.module} (not a public package)")
                    continue
                wrong += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                          if a.name not in PUBLIC[node.module]]  # fmt: skip
    assert not wrong, "\n".join(wrong)


def test_the_claude_package_loads_the_sdk_only_when_the_caller_is_asked_for() -> None:
    """Workers of the other stages never pay the Anthropic SDK's import."""
    import subprocess
    import sys

    code = (
        "import sys, pipeline.claude as c\n"
        "before = 'anthropic' in sys.modules\n"
        "c.Caller\n"
        "print(before, 'anthropic' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)  # fmt: skip
    assert out.stdout.split() == ["False", "True"]
