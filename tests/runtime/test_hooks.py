"""The one observation seam: hooks are called only for what they override, a hook that
raises never fails anything, and a worker has at most one tracer."""

from __future__ import annotations

import logging

import pytest

from pipeline.runtime.calls import CallReport
from pipeline.runtime.hooks import Hook, Hooks
from pipeline.runtime.stage import Message


def report(status: int = 200) -> CallReport:
    return CallReport(
        family="haiku", request_model="m", response_model="m", max_tokens=10, status=status,
        started_ns=1, ended_ns=2, usage=None, error_type=None,
    )  # fmt: skip


class Calls(Hook):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_call(self, report: CallReport) -> None:
        self.seen.append(report.status)


class Broken(Hook):
    def on_call(self, report: CallReport) -> None:
        raise RuntimeError("observer bug")


class Tracer(Hook):
    def start_span(self, msg: Message) -> None:
        return None


def test_call_reports_reach_every_call_hook_and_a_broken_one_is_only_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, last = Calls(), Calls()
    hooks = Hooks([first, Broken(), Tracer()])
    assert hooks.observing_calls and not hooks, "no hook observes handling"
    hooks.add(last)
    with caplog.at_level(logging.ERROR, logger="pipeline.runtime.hooks"):
        hooks.call(report(429))
    assert first.seen == last.seen == [429]
    assert "Broken.on_call failed" in caplog.text


def test_one_tracer_per_worker_and_none_by_default() -> None:
    assert Hooks().tracer is None and not Hooks().observing_calls
    tracer = Tracer()
    assert Hooks([Calls(), tracer]).tracer is tracer
    with pytest.raises(ValueError, match="one tracer per worker"):
        Hooks([tracer, Tracer()])


@pytest.mark.anyio
async def test_only_hooks_that_override_an_event_get_it() -> None:
    got: list[str] = []

    class Starts(Hook):
        async def on_worker_start(self, stage: str) -> None:
            got.append(stage)

    hooks = Hooks([Calls(), Starts()])
    assert hooks, "a hook observes handling"
    await hooks.emit("on_worker_start", "router")
    await hooks.emit("on_worker_stop", "router", after=True)
    assert got == ["router"]
