"""One exception tree; the runtime decides what to do with an entry by class, never by text.

PipelineError
├── ConfigError(field)       bad setting: fail at start, naming the field
├── InvalidTask              bad input: dead-letter now, no retry
├── TransientError           retry later (retry_after_s honoured)
├── PermanentError           fail the task (dead-letter with the reason)
├── AuthError                pause the stage; the queue is left untouched
├── RedisUnavailable         wait and reconnect
└── Backpressure             the ingress is full; the producer should slow down
"""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error the pipeline raises on purpose."""


class ConfigError(PipelineError):
    """A setting is missing or malformed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"config: {field}: {message}")
        self.field = field


class InvalidTask(PipelineError):
    """The entry can never succeed as it is (undecodable, missing fields, too large)."""


class TransientError(PipelineError):
    """Worth trying again later: rate limits, overloads, 5xx, timeouts."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentError(PipelineError):
    """The request is wrong; trying again would fail the same way."""


class AuthError(PipelineError):
    """Credentials are refused: pause instead of draining the queue into the DLQ."""

    def __init__(self, message: str, pause_s: float = 30.0) -> None:
        super().__init__(message)
        self.pause_s = pause_s


class RedisUnavailable(PipelineError):
    """Redis could not be reached; callers wait and reconnect."""


class Backpressure(PipelineError):
    """The ingress stream holds more than the configured cap."""
