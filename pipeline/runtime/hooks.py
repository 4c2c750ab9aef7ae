"""The one seam everything that observes a worker plugs into: tracing, metrics, the rate
limiter's learning from calls, and an application's own hooks.

A `Hook` overrides what it needs; the rest are no-ops, and `Hooks` calls only the hooks
that override a method. "Before" hooks run in order and "after" hooks in reverse; a hook
that raises is logged and ignored, so a broken plugin never fails a task. Hooks observe;
they never move an entry.

Three methods are synchronous, for what runs per entry or per call and must cost nothing
when unused: `start_span` (the tracer, asked once when an entry is taken; one hook at most),
`on_call` (an outbound model call a handler made, reported in the handler's own task, so the
entry's span is current) and `on_release` (a task a stage held outside its streams was handed
on, `pipeline.runtime.held`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline.runtime.calls import CallReport
from pipeline.runtime.held import HeldReport

if TYPE_CHECKING:
    from pipeline.runtime.outcome import Outcome
    from pipeline.runtime.stage import Message
    from pipeline.runtime.tracer import EntrySpan

__all__ = ["Hook", "Hooks"]

log = logging.getLogger(__name__)


class Hook:
    """Base class: override only what you need."""

    async def on_worker_start(self, stage: str) -> None: ...
    async def on_worker_stop(self, stage: str) -> None: ...
    async def before_handle(self, msg: Message) -> None: ...
    async def after_handle(self, msg: Message, outcome: Outcome | BaseException) -> None: ...
    async def on_retry(self, msg: Message, delay_ms: int, reason: str) -> None: ...
    async def on_reclaim(self, stage: str, entry_ids: Sequence[str]) -> None: ...
    async def on_dead_letter(self, stage: str, task_id: str, reason: str) -> None: ...

    def start_span(self, msg: Message) -> EntrySpan | None:
        """The entry's span, or None to leave it alone (its trace context goes on as it
        came). Asked synchronously once per entry; must not raise (`runtime.tracer`)."""
        return None

    def on_call(self, report: CallReport) -> None:
        """A handler's outbound model call ended (in the handler's task)."""

    def on_release(self, report: HeldReport) -> None:
        """A task a stage held outside its streams was handed on (in the stage's own task,
        not an entry's: no span is current)."""


_ASYNC = ("on_worker_start", "on_worker_stop", "before_handle", "after_handle", "on_retry",
          "on_reclaim", "on_dead_letter")  # fmt: skip


class Hooks:
    """Runs a list of hooks with the ordering and isolation rules above."""

    def __init__(self, hooks: Sequence[Hook] = ()) -> None:
        self._hooks: tuple[Hook, ...] = ()
        self.add(*hooks)

    def add(self, *hooks: Hook) -> None:
        """Plug more hooks in (e.g. a stage's collaborator that learns from calls)."""
        self._hooks = (*self._hooks, *hooks)
        self._reversed = tuple(reversed(self._hooks))
        # Per entry every hook call counts, so only the hooks that override a method are
        # called for it.
        self._by_name: dict[tuple[str, bool], tuple[Hook, ...]] = {}
        tracers = _overriding(self._hooks, "start_span")
        if len(tracers) > 1:
            names = ", ".join(type(h).__name__ for h in tracers)
            raise ValueError(f"one tracer per worker, got {names}")
        #: The hook that traces entries, if any: the runtime asks it about each entry.
        self.tracer: Hook | None = tracers[0] if tracers else None
        self._on_call = _overriding(self._hooks, "on_call")
        self._on_release = _overriding(self._hooks, "on_release")
        self._handling = any(_overriding(self._hooks, name) for name in _ASYNC)

    def __bool__(self) -> bool:
        """Whether any hook observes handling (the async methods; tracing and calls have
        their own checks)."""
        return self._handling

    @property
    def observing_calls(self) -> bool:
        return bool(self._on_call)

    def call(self, report: CallReport) -> None:
        """Hand a call's report to every hook that watches calls."""
        for hook in self._on_call:
            try:
                hook.on_call(report)
            except Exception:
                log.exception("hook %s.on_call failed (ignored)", type(hook).__name__)

    def released(self, report: HeldReport) -> None:
        """Hand a held task's report to every hook that watches them."""
        for hook in self._on_release:
            try:
                hook.on_release(report)
            except Exception:
                log.exception("hook %s.on_release failed (ignored)", type(hook).__name__)

    async def emit(self, name: str, *args: object, after: bool = False) -> None:
        hooks = self._by_name.get((name, after))
        if hooks is None:
            hooks = _overriding(self._reversed if after else self._hooks, name)
            self._by_name[name, after] = hooks
        for hook in hooks:
            try:
                await getattr(hook, name)(*args)
            except Exception:
                log.exception("hook %s.%s failed (ignored)", type(hook).__name__, name)


def _overriding(hooks: Sequence[Hook], name: str) -> tuple[Hook, ...]:
    return tuple(h for h in hooks if getattr(type(h), name) is not getattr(Hook, name))
