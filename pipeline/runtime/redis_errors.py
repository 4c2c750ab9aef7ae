"""What each Redis error means to a worker: one table, read by `Availability.call`.

A worker must never exit because of a state the server will leave by itself (the "Shutdown is
clean" guarantee): a restart, a slow script, a full memory, a failover, a Cluster resharding.
Those are waited out with backoff. A stream or consumer group that vanished (a Redis restarted
without persistence, or an operator's `DEL`) is recreated by whoever owns it. Refused
credentials or permissions will not fix themselves: the worker stops with one clear line.
Anything else is a bug or a bad command, and is raised as it is.

Every wait is safe to retry: a server that answers one of these errors refused the whole
command (a script is refused before its first write, never halfway), and a connection lost
mid-command is retried by callers whose scripts are idempotent or fenced.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    NoPermissionError,
    ReadOnlyError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline.runtime.errors import PipelineError


class Action(enum.Enum):
    WAIT = "wait"  # back off and try again; one log line per change of state
    RECREATE = "recreate"  # recreate the stream's consumer group, then try again
    STOP = "stop"  # stop the worker with the reason: it will not fix itself


@dataclass(frozen=True, slots=True)
class Fault:
    """One row of the table: an error code (or "connection"), what to do, and what it means."""

    code: str
    action: Action
    meaning: str


TABLE: tuple[Fault, ...] = (
    Fault("connection", Action.WAIT, "cannot reach Redis (refused, reset or timed out)"),
    Fault("LOADING", Action.WAIT, "Redis is loading its dataset after a restart"),
    Fault("BUSY", Action.WAIT, "a script or function runs past busy-reply-threshold"),
    Fault("OOM", Action.WAIT, "Redis is at maxmemory (noeviction): writes are refused"),
    Fault("MASTERDOWN", Action.WAIT, "the replica lost its primary"),
    Fault("READONLY", Action.WAIT, "connected to a replica (a failover in progress?)"),
    Fault("TRYAGAIN", Action.WAIT, "a Cluster slot is migrating"),
    Fault("CLUSTERDOWN", Action.WAIT, "the Cluster is down"),
    Fault("UNBLOCKED", Action.WAIT, "a blocked read was cut: the server turned replica?"),
    Fault("NOGROUP", Action.RECREATE, "a stream or its consumer group is gone"),
    Fault("NOAUTH", Action.STOP, "Redis wants a password: put it in REDIS_URL"),
    Fault("WRONGPASS", Action.STOP, "Redis refused the user or password in REDIS_URL"),
    Fault("NOPERM", Action.STOP, "the Redis ACL user lacks a permission the worker needs"),
)
_BY_CODE = {fault.code: fault for fault in TABLE}
_CONNECTION = _BY_CODE["connection"]
#: An error code at the start of the reply, or where a script's error quotes it (Redis 6.2
#: wraps it: "ERR Error running script (call to f_…): @user_script:17: -NOGROUP …").
_CODE = re.compile(r"(?:^|: -)([A-Z]+)\b")
#: Refusals whose reply carries no code of their own (Redis 7.0 reports a script's NOPERM
#: as a plain ERR; redis-py strips WRONGPASS and NOAUTH alike into AuthenticationError).
_TEXTS = (
    ("can't run this command", "NOPERM"),
    ("no permissions to", "NOPERM"),
    ("Authentication required", "NOAUTH"),
    # A new connection's HELLO before any AUTH (redis-py's first words on some connections):
    # the server wants a password just the same.
    ("HELLO must be called with the client already authenticated", "NOAUTH"),
)
_CLASSES: tuple[tuple[type[BaseException], str], ...] = (
    (BusyLoadingError, "LOADING"),
    (ReadOnlyError, "READONLY"),
    (NoPermissionError, "NOPERM"),
    (AuthorizationError, "NOPERM"),
)


class RedisRefused(PipelineError):
    """Redis refuses this worker for a reason that waiting will not fix."""


def classify(exc: BaseException) -> Fault | None:
    """The table's row for `exc`, or None for an error no wait can fix (a bug)."""
    text = str(exc)
    for needle, code in _TEXTS:
        if needle in text:
            return _BY_CODE[code]
    if isinstance(exc, AuthenticationError):
        return _BY_CODE["WRONGPASS"]
    for cls, code in _CLASSES:
        if isinstance(exc, cls):
            return _BY_CODE[code]
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | ConnectionError | OSError):
        return _CONNECTION
    for match in _CODE.finditer(text):
        if (fault := _BY_CODE.get(match.group(1))) is not None:
            return fault
    # redis-py strips a reply's leading error code when it maps it to a class of its own
    # (OutOfMemoryError, TryAgainError, MasterDownError, ClusterDownError): the class says it.
    return _BY_CLASS_NAME.get(type(exc).__name__)


_BY_CLASS_NAME = {
    "OutOfMemoryError": _BY_CODE["OOM"],
    "TryAgainError": _BY_CODE["TRYAGAIN"],
    "MasterDownError": _BY_CODE["MASTERDOWN"],
    "ClusterDownError": _BY_CODE["CLUSTERDOWN"],
}
