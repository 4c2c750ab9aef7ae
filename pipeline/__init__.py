"""Claude pipeline on Redis Streams: the runtime's public API (stages import only this)."""

from __future__ import annotations

from pipeline.config import Settings, load_settings
from pipeline.errors import (
    AuthError,
    Backpressure,
    ConfigError,
    InvalidTask,
    PermanentError,
    PipelineError,
    RedisUnavailable,
    TransientError,
)
from pipeline.hooks import Hook
from pipeline.keys import Keys
from pipeline.outcome import Complete, Defer, Drop, Fail, Forward, Outcome, Reject, Retry
from pipeline.services import ResponseCache, Services
from pipeline.stage import App, Handler, HandlerFactory, Message, Stage

__all__ = [
    "App",
    "AuthError",
    "Backpressure",
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
    "ResponseCache",
    "Retry",
    "Services",
    "Settings",
    "Stage",
    "TransientError",
    "load_settings",
]
