"""What a handler returns; the runtime turns each into one atomic hand-off (the "Nothing is
lost" guarantee)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Forward:
    """Hand the task on to another stage (`lane` picks one of its streams, e.g. a model family).

    `fields`: the producer's fields the task carries on (default: all of them as they came).
    A stage that has parsed them into `body` keeps only what later stages still read, so an
    entry never carries the producer's request twice.
    """

    to: str
    body: Any = None
    lane: str | None = None
    fields: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Complete:
    """The task is finished; `result` (if any) is stored first-writer-wins with a TTL:
    `ttl_s`, else the task's own (`pipeline.runtime.results.result_ttl`)."""

    result: Mapping[str, str] | None = None
    ttl_s: int | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    """Try this stage again later, through the durable delayed set (never a sleep)."""

    reason: str
    delay_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Defer:
    """Try this stage again after `delay_ms` without spending a retry attempt: nothing
    failed, the task must wait (e.g. for tomorrow's budget)."""

    reason: str
    delay_ms: int


@dataclass(frozen=True, slots=True)
class Fail:
    """Give up: dead-letter the entry with the reason and store a `failed` result."""

    reason: str
    result: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Drop:
    """This entry repeats work already in hand (another entry of the same task is live, or
    the task is finished): acknowledge it and write nothing."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reject:
    """This entry reuses the id of a live task for another request: dead-letter it with the
    reason, but write nothing under the id (the task that owns it keeps its result)."""

    reason: str


Outcome = Forward | Complete | Retry | Defer | Fail | Drop | Reject
