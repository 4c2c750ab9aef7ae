"""How the `pipeline` command ends: its exit codes, and the one place that words a failure.

Every command exits with one of `Code` (docs/CLI.md has the table), and says what went wrong
in one line on stderr, never a traceback for a failure it expected:

    error: <label>: <message>; <hint>      usage, configuration, unreachable (2, 4)
    <message>; <hint>                      an outcome: the task failed, nothing in time (1, 3)

A command raises `CliError` (or lets a `PipelineError`, a Redis error or a usage error go);
`OneLineErrors`, the command group's class, turns each into its line and code with `explain`.
"""

from __future__ import annotations

import enum
from typing import Any, cast

import typer
import typer.core
from redis.exceptions import RedisError
from rich.text import Text

from pipeline.cli.common import err
from pipeline.runtime.errors import (
    Backpressure,
    ConfigError,
    InvalidTask,
    PipelineError,
    RedisUnavailable,
)
from pipeline.runtime.redis_errors import Action, RedisRefused, classify

__all__ = ["CliError", "Code", "OneLineErrors", "explain", "fail", "say"]


class Code(enum.IntEnum):
    """The exit codes, the same for every command."""

    OK = 0  # done; the task completed
    FAILED = 1  # the task failed, or what was asked for is not there (or was declined)
    USAGE = 2  # bad flags or values, bad configuration, a missing extra, a port in use
    TIMEOUT = 3  # no result in time: --wait ran out (or, without --wait, none yet)
    UNAVAILABLE = 4  # Redis unreachable, or the ingress full: the same command may work later
    INTERRUPTED = 130  # Ctrl-C


#: Codes whose line starts with `error:` (the command could not do its job); the others are
#: outcomes of a job done (a task failed, no result in time) and say just what happened.
_ERRORS = frozenset({Code.USAGE, Code.UNAVAILABLE})


class CliError(Exception):
    """A failure the command expected: its line is `say(message, code, label, hint)`."""

    def __init__(
        self, message: str, code: int, *, label: str | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.label = label
        self.hint = hint


def fail(message: str, code: int, *, label: str | None = None, hint: str | None = None) -> CliError:
    """`raise fail(...)`: end the command with one line and `code`."""
    return CliError(message, code, label=label, hint=hint)


def line(message: str, code: int, label: str | None = None, hint: str | None = None) -> Text:
    """The one format of a failure's line (see the module docstring)."""
    text = Text()
    if code in _ERRORS:
        text.append("error:", style="bold red")
        text.append(" ")
    if label:
        text.append(f"{label}: ", style="bold" if code in _ERRORS else "")
    message = " ".join(message.split())  # one line, whatever the message held
    text.append(message.rstrip(".") if hint else message)
    if hint:
        text.append(f"; {' '.join(hint.split())}", style="dim" if code in _ERRORS else "")
    return text


def say(message: str, code: int, label: str | None = None, hint: str | None = None) -> None:
    """Print a failure's line on stderr (one line: the console does not wrap)."""
    err.print(line(message, code, label, hint), highlight=False, soft_wrap=True)


#: click's UsageError (bad flags and values), found through typer's public BadParameter:
#: typer vendors click in newer versions and uses click itself in older ones.
_UsageError = cast(
    "type[Exception]", next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
)


_REDIS_HINT = "start Redis, or set REDIS_URL (pipeline demo starts a private one)"
_CONFIG_HINT = "check --config or PIPELINE_CONFIG"


def explain(exc: BaseException) -> CliError | None:
    """The line and code for an exception the command expected; None for anything else (a
    bug, which keeps its traceback)."""
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, ConfigError):
        # "config: <field>: <problem>"; the field "config" is the file itself: said once.
        problem = str(exc).removeprefix("config: ")
        if exc.field == "config":
            problem = problem.removeprefix("config: ")
            return CliError(problem, Code.USAGE, label="config", hint=_CONFIG_HINT)
        return CliError(problem, Code.USAGE, label="config")
    if isinstance(exc, RedisUnavailable | RedisError | RedisRefused):
        return _redis(exc)
    if isinstance(exc, Backpressure):
        return CliError(str(exc), Code.UNAVAILABLE, label="ingress full",
                        hint="submit again once the workers catch up")  # fmt: skip
    if isinstance(exc, InvalidTask):
        return CliError(str(exc), Code.USAGE, label="task")
    if isinstance(exc, PipelineError):
        return CliError(str(exc), Code.USAGE)
    if isinstance(exc, _UsageError) and type(exc).__name__ != "NoArgsIsHelpError":
        return _usage(exc)
    return None


def _redis(exc: BaseException) -> CliError:
    """Redis away (4: try again later) or refusing us (2: fix the URL or the ACL)."""
    cause = (exc.__cause__ or exc.__context__) if isinstance(exc, RedisUnavailable) else exc
    fault = classify(cause) if cause is not None else None
    message = str(exc)
    if isinstance(exc, RedisRefused) or (fault is not None and fault.action is Action.STOP):
        meaning = fault.meaning if fault is not None else None
        return CliError(message, Code.USAGE, label="redis", hint=meaning)
    if isinstance(exc, RedisUnavailable) or (fault is not None and fault.action is Action.WAIT):
        hint = _REDIS_HINT if fault is None or fault.code == "connection" else fault.meaning
        return CliError(message, Code.UNAVAILABLE, label="redis", hint=hint)
    return CliError(message, Code.USAGE, label="redis")


def _usage(exc: Exception) -> CliError:
    message = " ".join(str(getattr(exc, "format_message", lambda: str(exc))()).split())
    ctx = getattr(exc, "ctx", None)
    where = f"see {ctx.command_path} --help" if ctx is not None else None
    # our own BadParameter("…") reads "Invalid value: …": the label says it already
    message = message.removeprefix("Invalid value: ")
    return CliError(message, Code.USAGE, label="usage", hint=where)


class OneLineErrors(typer.core.TyperGroup):
    """The command group: any command's expected failure ends as one line and its code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            found = explain(exc)
            if found is None:
                raise
            say(found.message, found.code, found.label, found.hint)
            raise typer.Exit(found.code) from None
