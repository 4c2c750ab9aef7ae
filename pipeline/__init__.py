"""Claude pipeline on Redis Streams: what an application's stages import.

The runtime's API (`pipeline.runtime`) and the pipeline's `Settings`; the Claude domain's
types and services are `pipeline.claude`'s.
"""

from __future__ import annotations

from pipeline.claude.config import load_settings
from pipeline.claude.settings import Settings
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
from pipeline.runtime.services import Services
from pipeline.runtime.stage import App, Handler, HandlerFactory, Message, Stage

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
    "Retry",
    "Services",
    "Settings",
    "Stage",
    "TransientError",
    "load_settings",
]
