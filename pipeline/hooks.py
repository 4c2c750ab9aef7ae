"""Cross-cutting concerns (tracing, metrics) observe the runtime through hooks.

Every method is a no-op; subclasses override what they need. "Before" hooks run in order and
"after" hooks in reverse; a hook that raises is logged and ignored, so a broken plugin never
fails a task. Hooks observe; they never move an entry (`on_handoff` may only choose the trace
context the outgoing entry carries).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.outcome import Outcome
    from pipeline.stage import Message

log = logging.getLogger(__name__)

#: A W3C trace context as it travels with a task: (traceparent, tracestate).
TraceContext = tuple[str, str | None]


class Hook:
    """Base class: override only what you need."""

    async def on_worker_start(self, stage: str) -> None: ...
    async def on_worker_stop(self, stage: str) -> None: ...
    async def before_handle(self, msg: Message) -> None: ...
    async def after_handle(self, msg: Message, outcome: Outcome | BaseException) -> None: ...
    async def on_retry(self, msg: Message, delay_ms: int, reason: str) -> None: ...
    async def on_reclaim(self, stage: str, entry_ids: Sequence[str]) -> None: ...
    async def on_dead_letter(self, stage: str, task_id: str, reason: str) -> None: ...

    def on_handoff(
        self, msg: Message, action: str, detail: str, delay_ms: int | None
    ) -> TraceContext | None:
        """The runtime is building the entry that carries `msg`'s task on.

        Synchronous and in the handler's task, before `after_handle`, so a tracer can record
        the decision on the stage's span and give the next entry that span's context (the
        trace a first stage started must reach the stages after it). `action` is `forward`
        (detail: the target stage), `retry`, `defer` or `pause` (detail: the reason;
        `delay_ms`), or `dead_letter` (detail: the reason; the handler may not have run).
        Returns the trace context to send on, or None to send the incoming one.
        """
        return None


class Hooks:
    """Runs a list of hooks with the ordering and isolation rules above."""

    def __init__(self, hooks: Sequence[Hook] = ()) -> None:
        self._hooks = tuple(hooks)
        self._reversed = tuple(reversed(self._hooks))
        # Per entry every hook call counts (tracing's budget is a few microseconds), so only
        # the hooks that override a method are called for it.
        self._handoffs = _overriding(self._hooks, "on_handoff")
        self._by_name: dict[tuple[str, bool], tuple[Hook, ...]] = {}

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def handoff(
        self, msg: Message, action: str, detail: str = "", delay_ms: int | None = None
    ) -> TraceContext | None:
        """Every hook's `on_handoff`; the first trace context one returns wins."""
        carried: TraceContext | None = None
        for hook in self._handoffs:
            try:
                got = hook.on_handoff(msg, action, detail, delay_ms)
            except Exception:
                log.exception("hook %s.on_handoff failed (ignored)", type(hook).__name__)
                continue
            if carried is None:
                carried = got
        return carried

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
