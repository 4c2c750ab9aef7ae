"""Tasks a stage holds outside its streams, and how the runtime sees them.

Most stages keep a task in their input stream until they hand it on, so backlog, pending
and age say everything. A stage that must hold tasks for hours (one that gathers them into
a batch a remote API answers later) takes them off the stream into a store of its own; the
runtime knows nothing of that store, so the stage tells it two things:

- *how many it holds*, by state, and the oldest one's age (`HeldStatus`, read by the stage's
  `Stage.held` reader in the same poll as the streams' numbers: status, gauges);
- *each task it lets go* (`HeldReport`, reported to the worker's hooks after the task was
  handed on): the time it was held, for a histogram and a span in the task's trace.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from pipeline.runtime.keys import Keys

__all__ = ["HeldReader", "HeldReport", "HeldStatus"]


class HeldStatus(msgspec.Struct, frozen=True, kw_only=True):
    """What one lane of a stage holds outside its stream at one moment."""

    stage: str
    lane: str | None
    tasks: dict[str, int]  # by state, in the stage's words (e.g. queued, in_batch)
    oldest_s: float | None  # age of the oldest held task (None: holds none)


#: A stage's reader: (redis, keys, lane) -> what that lane holds now.
HeldReader = Callable[["Redis", "Keys", "str | None"], Awaitable[HeldStatus]]


@dataclass(frozen=True, slots=True)
class HeldReport:
    """A held task was handed on (never the prompt: ids, times and the stage's own labels).

    `outcome` says where it went, in the stage's words (`answered`, `to_standard`); the
    trace context is the one the task carried when it was taken in, so a tracer can put the
    wait in the task's trace; `attributes` are what the stage adds to that span (the batch's
    id)."""

    stage: str
    lane: str | None
    task_id: str
    outcome: str
    held_ns: int  # time.time_ns() when taken in, and when handed on
    released_ns: int
    traceparent: str | None = None
    tracestate: str | None = None
    attributes: Mapping[str, str] | None = None
