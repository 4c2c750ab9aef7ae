"""A stage is an input stream, a consumer group and a handler; an App is the set of stages."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import msgspec

from pipeline.runtime.errors import InvalidTask
from pipeline.runtime.held import HeldReader
from pipeline.runtime.outcome import Outcome
from pipeline.runtime.wire import Envelope, decode_body

if TYPE_CHECKING:
    from pipeline.runtime.services import Services

_B = TypeVar("_B")


class Lease(NamedTuple):
    """What proves a worker still owns an entry: it is pending in `stream`'s `group` to
    `consumer` with this delivery count. Other records (a paid call's claim) may name it,
    so that anyone can tell a live holder from one that died or stalled past its lease."""

    stream: str
    group: str
    consumer: str
    entry_id: str
    deliveries: int

    def token(self) -> str:
        return f"{self.stream}\n{self.group}\n{self.entry_id}\n{self.consumer}\n{self.deliveries}"


@dataclass(slots=True)
class Message:
    """One entry as a handler sees it."""

    envelope: Envelope
    entry_id: str
    stage: str
    lane: str | None
    deliveries: int
    #: (stream, group, consumer) the entry was read from and by: shared by a runner's
    #: messages (see `lease`); None outside a worker.
    where: tuple[str, str, str] | None = None
    #: Monotonic time until which shutdown lets the handler finish (see `finish_before_exit`).
    finish_by: float = 0.0
    #: The entry's size in bytes as it was read (set at the first stage only, which decides
    #: whether a task is small enough to travel the whole pipeline).
    size: int = 0

    def finish_before_exit(self, within_s: float) -> None:
        """At shutdown, let this handler run up to `within_s` more instead of cancelling
        it at the grace period: it has started work that is paid for and cannot be taken
        back (a Claude call already sent), so its result must be recorded and handed on."""
        self.finish_by = time.monotonic() + within_s

    @property
    def lease(self) -> Lease | None:
        """What proves this worker still owns the entry (None outside a worker)."""
        if self.where is None:
            return None
        return Lease(*self.where, self.entry_id, self.deliveries)

    def lease_token(self) -> str:
        """The lease as one string (`Lease.token`); a bare entry id outside a worker."""
        lease = self.lease or Lease("", "", "", self.entry_id, self.deliveries)
        return lease.token()

    @property
    def task_id(self) -> str:
        return self.envelope.task_id

    @property
    def origin_id(self) -> str:
        """The ingress entry id the task came in by (the same on every retry)."""
        return self.envelope.origin_id or self.entry_id

    @property
    def fields(self) -> dict[str, str]:
        """The producer's original fields."""
        return self.envelope.fields

    @property
    def attempt(self) -> int:
        """1 for the first try at this stage, 2 after one retry, …"""
        return self.envelope.attempt

    def body(self, kind: type[_B]) -> _B:
        """The previous stage's payload, decoded as `kind`.

        Raises:
            InvalidTask: the body does not decode as `kind` (no retry can fix that).
        """
        try:
            return decode_body(self.envelope.body, kind)  # type: ignore[return-value]
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise InvalidTask(f"{self.stage}: body is not a valid {kind.__name__}: {exc}") from None

    @property
    def has_body(self) -> bool:
        return bytes(self.envelope.body) != b"\xc0"


Handler = Callable[[Message], Awaitable[Outcome]]
#: Builds a stage's handler once per worker process, from the services the runtime lends.
HandlerFactory = Callable[["Services[Any]"], Awaitable[Handler]]


@dataclass(frozen=True, slots=True)
class Stage:
    """A named step of the pipeline.

    Args:
        name: as on the command line and in metrics (`cache-check`).
        stream: the key suffix of its input stream (`tasks`, `route`, `call`, `store`).
        handler: parse -> decide -> return an Outcome.
        build: instead of `handler`, an async factory called once per worker with the
            `Services` (settings, cache, ledger), for stages that need clients or state.
        lanes: one input stream per lane (claude-call: one per model family).
        concurrency: default in-flight limit per process (config may override).
        held: for a stage that holds tasks outside its stream (`pipeline.runtime.held`),
            what reads how many each lane holds, for status and metrics.
    """

    name: str
    stream: str
    handler: Handler | None = None
    lanes: tuple[str, ...] = ()
    concurrency: int | None = None
    build: HandlerFactory | None = None
    held: HeldReader | None = None

    def __post_init__(self) -> None:
        if (self.handler is None) == (self.build is None):
            raise ValueError(f"stage {self.name!r}: give exactly one of handler= or build=")


@dataclass(frozen=True)
class App:
    """The stages a worker can run, in pipeline order (the first reads the ingress)."""

    stages: tuple[Stage, ...]
    extras: dict[str, Any] = field(default_factory=dict)

    def __init__(self, stages: Iterable[Stage], **extras: Any) -> None:
        object.__setattr__(self, "stages", tuple(stages))
        object.__setattr__(self, "extras", extras)
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate stage names: {names}")

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        known = ", ".join(s.name for s in self.stages)
        raise KeyError(f"unknown stage {name!r} (known: {known})")
