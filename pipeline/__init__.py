"""Claude pipeline on Redis Streams: what an application's stages import.

The runtime's API (`pipeline.runtime`) and the pipeline's `Settings`; the Claude domain's
types and services are `pipeline.claude`'s.
"""

from __future__ import annotations

from pipeline.claude.config import load_settings
from pipeline.claude.settings import Settings
from pipeline.runtime import (
    App,
    AuthError,
    Backpressure,
    Complete,
    ConfigError,
    Defer,
    Drop,
    Fail,
    Forward,
    Handler,
    HandlerFactory,
    Hook,
    InvalidTask,
    Keys,
    Message,
    Outcome,
    PermanentError,
    PipelineError,
    RedisUnavailable,
    Reject,
    Retry,
    Services,
    Stage,
    TransientError,
)

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
