"""What an outbound model call reports, and where a stage sends the report.

Kept apart from `pipeline.runtime.hooks` so that the services a stage is built with can
carry the worker's hooks without depending on the stage types the hooks observe.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pipeline.runtime.held import HeldReport

__all__ = ["CallReport", "CallSink", "TokenUsage"]


class TokenUsage(Protocol):
    """Tokens one call used, as model APIs count them."""

    @property
    def input_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def cache_read_input_tokens(self) -> int: ...
    @property
    def cache_creation_input_tokens(self) -> int: ...


@dataclass(frozen=True, slots=True)
class CallReport:
    """What one outbound model call did, for metrics, tracing and rate limits (never the
    prompt or the key). `family` is the application's label for the model's limits."""

    family: str
    request_model: str
    response_model: str | None  # None when the call failed
    max_tokens: int
    status: int  # HTTP status: 200, 429, 529, …; 0 for a timeout or connection error
    started_ns: int  # time.time_ns() at the start and end of the call
    ended_ns: int
    usage: TokenUsage | None
    error_type: str | None  # the pipeline error class name when the call failed
    headers: Mapping[str, str] | None = None  # response headers (rate-limit state)


class CallSink(Protocol):
    """Where a stage reports its calls, and the tasks it held outside its streams: the
    worker's `Hooks`."""

    @property
    def observing_calls(self) -> bool:
        """Whether anyone listens (skip building reports if not)."""

    def call(self, report: CallReport) -> None: ...

    def released(self, report: HeldReport) -> None: ...
