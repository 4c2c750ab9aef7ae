"""What a stage's consumer holds, and what its lease and retry loops may see of it.

`Inflight` is one entry from read until its hand-off is confirmed. `Consumer` is the face
`StageRunner` shows `pipeline.runtime.leases`, `pipeline.runtime.delayed` and
`pipeline.runtime.planner`: they renew, reclaim, promote and plan hand-offs through it and
never reach into the runner itself.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.runtime.context import WorkerContext
from pipeline.runtime.keys import Keys
from pipeline.runtime.settings import RuntimeSettings
from pipeline.runtime.stage import Message, Stage
from pipeline.runtime.tracer import EntrySpan

__all__ = ["Consumer", "Inflight"]


@dataclass(slots=True)
class Inflight:
    """An entry this worker holds: from read until its hand-off is confirmed."""

    entry_id: str
    deliveries: int
    confirmed_at: float  # monotonic time before the command that last confirmed ownership
    task: asyncio.Task[None] | None = None
    lost: bool = False
    decided: bool = False  # the handler returned; the hand-off is queued or sent
    msg: Message | None = field(default=None, repr=False)
    span: EntrySpan | None = field(default=None, repr=False)  # when its trace is sampled


class Consumer(Protocol):
    """One stage reading one stream (one lane) in this worker."""

    stage: Stage
    ctx: WorkerContext
    rt: RuntimeSettings  # the stage's runtime settings, its overrides applied
    keys: Keys  # the partition it serves (the worker's keys without partitions)
    stream: str
    delayed: str  # the stream's delayed-retry set
    group: str
    inflight: dict[str, Inflight]
    stats: dict[str, int]

    @property
    def name(self) -> str: ...

    @property
    def paused(self) -> bool: ...

    def free_slots(self) -> int: ...

    async def wait_for_slots(self, wanted: int) -> None: ...

    async def recreate_group(self) -> None:
        """The stream or group vanished (NOGROUP): recreate it, say what was lost."""

    def start(
        self, entry_id: str, raw: dict[bytes, bytes] | None, deliveries: int, confirmed_at: float
    ) -> None:
        """Take an entry this worker now owns (read, reclaimed or drained)."""
