"""Cross-cutting concerns (tracing, metrics) observe the runtime through hooks.

Every method is a no-op; subclasses override what they need. "Before" hooks run in order and
"after" hooks in reverse; a hook that raises is logged and ignored, so a broken plugin never
fails a task. Hooks observe; they never move an entry. Tracing is not a hook: it has its own
synchronous seam (`pipeline.runtime.tracer`), so that an entry it does not sample costs
nothing here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.runtime.outcome import Outcome
    from pipeline.runtime.stage import Message

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


class Hooks:
    """Runs a list of hooks with the ordering and isolation rules above."""

    def __init__(self, hooks: Sequence[Hook] = ()) -> None:
        self._hooks = tuple(hooks)
        self._reversed = tuple(reversed(self._hooks))
        # Per entry every hook call counts, so only the hooks that override a method are
        # called for it.
        self._by_name: dict[tuple[str, bool], tuple[Hook, ...]] = {}

    def __bool__(self) -> bool:
        return bool(self._hooks)

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
