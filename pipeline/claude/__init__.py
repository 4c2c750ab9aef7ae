"""The Claude domain the stages use: the request and answer types, routing, the paid call
(rate limits, budget, coalescing, task records), the response cache, prices and the ledger.

Built on the Claude-agnostic runtime (`pipeline.runtime`), never the other way round.
`Caller` (the paid call) is loaded on first use: it imports the Anthropic SDK, which costs
a second or more of CPU that a worker of the other stages should not pay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.claude.batch_status import held_in_batches
from pipeline.claude.budget import Budget, Reservation
from pipeline.claude.cache import ResponseCache
from pipeline.claude.config import load_settings
from pipeline.claude.flights import Flights, LeadLost
from pipeline.claude.ledger import Ledger
from pipeline.claude.long_calls import call_timeout_s, streams
from pipeline.claude.pricing import micro_usd, usd
from pipeline.claude.request import WIRE_FIELDS, parse_request, prompt_chars, validate_request
from pipeline.claude.routing import batched, route, route_to, unknown_model
from pipeline.claude.settings import Settings
from pipeline.claude.task import Answer, Request, Route, Routed, Usage
from pipeline.claude.task_record import Admission, Claim, ClaimState, TaskRecords

if TYPE_CHECKING:
    from pipeline.claude.batch_lane import BatchLane
    from pipeline.claude.caller import Caller, make_batch_client

__all__ = [
    "WIRE_FIELDS",
    "Admission",
    "Answer",
    "BatchLane",
    "Budget",
    "Caller",
    "Claim",
    "ClaimState",
    "Flights",
    "LeadLost",
    "Ledger",
    "Request",
    "Reservation",
    "ResponseCache",
    "Route",
    "Routed",
    "Settings",
    "TaskRecords",
    "Usage",
    "batched",
    "call_timeout_s",
    "held_in_batches",
    "load_settings",
    "make_batch_client",
    "micro_usd",
    "parse_request",
    "prompt_chars",
    "route",
    "route_to",
    "streams",
    "unknown_model",
    "usd",
    "validate_request",
]


def __getattr__(name: str) -> Any:
    if name in ("Caller", "make_batch_client"):
        from pipeline.claude import caller

        return getattr(caller, name)
    if name == "BatchLane":
        from pipeline.claude.batch_lane import BatchLane

        return BatchLane
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
