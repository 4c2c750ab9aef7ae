"""The task record's identities: a producer's fingerprint and a recorded answer's binding."""

from __future__ import annotations

from pipeline.claude.task import Request, Routed
from pipeline.claude.task_record import binding, fingerprint


def _routed(prompt: str, request_hash: str = "", model: str = "m", max_tokens: int = 9) -> Routed:
    request = Request(messages=[{"role": "user", "content": prompt}], request_hash=request_hash)
    return Routed(request=request, family="haiku", model=model, max_tokens=max_tokens)


def test_a_fingerprint_ignores_field_order_and_the_trace_context_only() -> None:
    fields = {"id": "a", "prompt": "hi", "type": "t"}
    same = {"type": "t", "prompt": "hi", "id": "a", "traceparent": "00-x", "tracestate": "k=v"}
    assert fingerprint(fields) == fingerprint(same)
    assert fingerprint(fields) != fingerprint({**fields, "metadata": "{}"})
    # field boundaries are part of it: moving text between two fields is another request
    assert fingerprint({"a": "bc", "d": "e"}) != fingerprint({"a": "b", "cd": "e"})


def test_a_binding_names_the_request_and_the_call_sent() -> None:
    assert binding(_routed("x", "h1")) == "h1:m:9"
    assert binding(_routed("x", "h1")) != binding(_routed("x", "h1", model="n"))
    assert binding(_routed("x", "h1")) != binding(_routed("x", "h1", max_tokens=10))


def test_hand_built_requests_without_a_hash_are_still_told_apart() -> None:
    """Regression: apps that build a Request themselves leave `request_hash` empty; their
    answers must not be bound to the model alone."""
    assert binding(_routed("capital of France")) != binding(_routed("capital of Japan"))
    assert binding(_routed("same")) == binding(_routed("same"))
