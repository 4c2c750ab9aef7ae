"""The stage runtime, which knows nothing of Claude: stages and their outcomes, the worker
loop over Redis Streams consumer groups (leases, hand-offs, delayed retries, the DLQ), the
wire format, the key layout, settings, and the Redis connection with its table of errors.

An application gives it an `App` of `Stage`s; each handler turns a `Message` into an
`Outcome`, and the runtime makes the hand-off atomic.
"""

from __future__ import annotations

from pipeline.runtime.errors import (
    AuthError,
    Backpressure,
    ConfigError,
    InvalidTask,
    PermanentError,
    PipelineError,
    RedisUnavailable,
    TransientError,
)
from pipeline.runtime.hooks import Hook
from pipeline.runtime.keys import Keys
from pipeline.runtime.outcome import Complete, Defer, Drop, Fail, Forward, Outcome, Reject, Retry
from pipeline.runtime.results import completed_result, failed_result, make_result, result_ttl
from pipeline.runtime.services import Services
from pipeline.runtime.settings import BaseSettings, load
from pipeline.runtime.stage import App, Handler, HandlerFactory, Message, Stage
from pipeline.runtime.traceparent import trace_id_of

__all__ = [
    "App",
    "AuthError",
    "Backpressure",
    "BaseSettings",
    "Complete",
    "ConfigError",
    "Defer",
    "Drop",
    "Fail",
    "Forward",
    "Handler",
    "HandlerFactory",
    "Hook",
    "InvalidTask",
    "Keys",
    "Message",
    "Outcome",
    "PermanentError",
    "PipelineError",
    "RedisUnavailable",
    "Reject",
    "Retry",
    "Services",
    "Stage",
    "TransientError",
    "completed_result",
    "failed_result",
    "load",
    "make_result",
    "result_ttl",
    "trace_id_of",
]
