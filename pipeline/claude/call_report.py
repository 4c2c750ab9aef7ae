"""The seam metrics, tracing and the rate limiter observe Claude calls through.

Kept apart from `pipeline.claude.api` so that observers can be imported without the SDK (whose
import costs over a second of CPU in a worker that never calls Claude).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pipeline.claude.task import Usage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CallReport:
    """What one Messages call did, for metrics and tracing (never the prompt or the key).

    Observers run synchronously in the handler's task, so the stage's trace context is
    current: a tracer can record the call as a CLIENT span from `started_ns`/`ended_ns`.
    """

    family: str
    request_model: str
    response_model: str | None  # None when the call failed
    max_tokens: int
    status: int  # HTTP status: 200, 429, 529, …; 0 for a timeout or connection error
    started_ns: int  # time.time_ns() at the start and end of the call
    ended_ns: int
    usage: Usage | None
    error_type: str | None  # the pipeline error class name when the call failed
    headers: Mapping[str, str] | None = None  # response headers (rate-limit state)


CallObserver = Callable[[CallReport], None]
_observers: list[CallObserver] = []


def observe_calls(observer: CallObserver) -> Callable[[], None]:
    """Call `observer` after every Messages call in this process; returns an undo function."""
    _observers.append(observer)
    return lambda: _observers.remove(observer) if observer in _observers else None


def observing() -> bool:
    """Whether any process-wide observer is registered (skip building reports if not)."""
    return bool(_observers)


def report_call(report: CallReport, own: CallObserver | None = None) -> None:
    """Hand `report` to `own` (the caller's) and then to every process-wide observer."""
    for observer in (own, *_observers) if own else tuple(_observers):
        try:
            observer(report)
        except Exception:
            log.exception("call observer %r failed (ignored)", observer)
