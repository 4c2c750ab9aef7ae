"""The Claude adapter: the only module that imports `anthropic`.

It builds the client (aiohttp transport, pool sized to the stage's concurrency, no SDK retries:
the runtime retries durably, the "Retries are durable" guarantee), makes one Messages call, and
maps every SDK error onto the pipeline's tree (STYLE rule 7) so the runtime can decide by class.
Messages it raises carry the status, the API's error text and the request id; never the API key,
never the prompt.
"""

from __future__ import annotations

import email.utils
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import anthropic
import httpx2
import msgspec

from pipeline.claude.settings import ClaudeSettings
from pipeline.claude.task import Answer, Routed, Usage
from pipeline.runtime.calls import CallReport
from pipeline.runtime.errors import AuthError, PermanentError, TransientError

__all__ = ["CallObserver", "call", "make_client", "map_error", "retry_after_s"]

#: Receives each call's report (the caller's: it settles the rate limiter and hands the
#: report to the worker's hooks).
CallObserver = Callable[[CallReport], None]

log = logging.getLogger(__name__)

#: Statuses worth trying again besides 429 and 5xx (the SDK's own retry policy agrees).
_RETRYABLE_4XX = frozenset({408, 409, 429, 499})
#: Account-wide refusals: every call would fail alike, so pause rather than dead-letter.
_AUTH = frozenset({401, 402, 403})
_MAX_MESSAGE_CHARS = 500
#: An unreachable API should free the slot for a retry long before a call's own timeout.
_CONNECT_TIMEOUT_S = 10.0


def make_client(
    settings: ClaudeSettings, concurrency: int, api_key: str | None = None
) -> anthropic.AsyncAnthropic:
    """An async client whose connection pool holds `concurrency` calls at once.

    Args:
        concurrency: the most calls this process keeps in flight through the client.
        api_key: None lets the SDK read `ANTHROPIC_API_KEY` (or its other credentials).
    """
    # httpx2 logs every request at INFO: at hundreds of calls a second, noise and CPU.
    http_log = logging.getLogger("httpx2")
    if http_log.level == logging.NOTSET:
        http_log.setLevel(logging.WARNING)
    # aiohttp costs ~1/6 of httpx's CPU per call at thousands in flight, with no connect
    # errors. Its transport takes only `max_connections` (as aiohttp's `limit`) from
    # the limits; left alone it would cap the pool at the SDK default.
    timeout = httpx2.Timeout(
        settings.timeout_s, connect=min(_CONNECT_TIMEOUT_S, settings.timeout_s)
    )
    http = anthropic.DefaultAioHttpClient(
        limits=httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        timeout=timeout,
    )
    return anthropic.AsyncAnthropic(
        api_key=api_key,
        base_url=settings.base_url,  # None: ANTHROPIC_BASE_URL, else the real API
        timeout=timeout,
        max_retries=0,
        http_client=http,
        # Each call is traced once, as the worker's `chat` span (when tracing is on): the
        # SDK's own span only when `ANTHROPIC_OPEN_TELEMETRY` asks for it. Left on, it costs
        # ~45 us of CPU per call even with no tracer provider to receive it.
        open_telemetry=None if "ANTHROPIC_OPEN_TELEMETRY" in os.environ else False,
    )


async def call(
    client: anthropic.AsyncAnthropic,
    routed: Routed,
    *,
    auth_pause_s: float = 30.0,
    on_report: CallObserver | None = None,
) -> Answer:
    """One Messages call for `routed`; the Answer's `attempts` is left for the caller.

    `on_report` receives this call's CallReport, in this task (so a tracer sees the stage's
    span current); nothing is built without it.

    Raises:
        TransientError: 429, 5xx/529, timeouts, connection errors (retry_after_s from headers).
        PermanentError: the request is wrong (400, 404, 413, 422, …).
        AuthError: credentials missing or refused (401/402/403), pausing `auth_pause_s`.
    """
    if client.api_key is None and client.auth_token is None and client.credentials is None:
        raise AuthError("claude: no API key (set ANTHROPIC_API_KEY)", pause_s=auth_pause_s)
    request = routed.request
    system: Any = anthropic.omit if request.system is None else request.system
    extra: dict[str, Any] = {}
    if request.temperature is not None:  # SDK 2.x dropped the keyword; the API still takes it
        extra["temperature"] = request.temperature
    started_ns = time.time_ns()
    try:
        # The raw body, decoded by msgspec into just the fields we keep: the SDK's pydantic
        # models cost CPU and long-lived objects (GC work) at thousands of calls in flight.
        raw = await client.messages.with_raw_response.create(
            model=routed.model,
            max_tokens=routed.max_tokens,
            messages=request.messages,  # type: ignore[arg-type]  # passed through untouched
            system=system,
            extra_body=extra or None,
        )
        body = await raw.read()
    except anthropic.AnthropicError as exc:
        error = map_error(exc, auth_pause_s)
        if on_report is not None:
            status = exc.status_code if isinstance(exc, anthropic.APIStatusError) else 0
            headers = exc.response.headers if isinstance(exc, anthropic.APIStatusError) else None
            _report(on_report, _failed(routed, started_ns, status, error, headers))
        raise error from None
    ended_ns = time.time_ns()
    try:
        message = _decode_message(body)
    except msgspec.DecodeError as exc:
        error = TransientError(f"claude: malformed response ({exc})")
        if on_report is not None:
            status = raw.http_response.status_code
            _report(on_report, _failed(routed, started_ns, status, error, raw.headers))
        raise error from None
    usage = message.usage
    answer = Answer(
        request=request,
        model=message.model or routed.model,
        output="".join(b.text for b in message.content if b.type == "text"),
        stop_reason=message.stop_reason or "",
        usage=Usage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_creation_input_tokens=usage.cache_creation_input_tokens or 0,
            cache_read_input_tokens=usage.cache_read_input_tokens or 0,
            cache_creation_1h_input_tokens=(
                usage.cache_creation.ephemeral_1h_input_tokens if usage.cache_creation else 0
            ),
        ),
        call_ms=(ended_ns - started_ns) // 1_000_000,
    )
    if on_report is not None:
        _report(
            on_report,
            CallReport(
                family=routed.family,
                request_model=routed.model,
                response_model=answer.model,
                max_tokens=routed.max_tokens,
                status=raw.http_response.status_code,
                started_ns=started_ns,
                ended_ns=ended_ns,
                usage=answer.usage,
                error_type=None,
                headers=raw.headers,
            ),
        )
    return answer


def _report(on_report: CallObserver, report: CallReport) -> None:
    """An observer that raises never fails the call (it was paid for)."""
    try:
        on_report(report)
    except Exception:
        log.exception("call observer %r failed (ignored)", on_report)


def _failed(
    routed: Routed,
    started_ns: int,
    status: int,
    error: Exception,
    headers: Mapping[str, str] | None,
) -> CallReport:
    return CallReport(
        family=routed.family,
        request_model=routed.model,
        response_model=None,
        max_tokens=routed.max_tokens,
        status=status,
        started_ns=started_ns,
        ended_ns=time.time_ns(),
        usage=None,
        error_type=type(error).__name__,
        headers=headers,
    )


class _Block(msgspec.Struct):
    type: str
    text: str = ""


class _CacheCreation(msgspec.Struct):
    ephemeral_5m_input_tokens: int = 0
    ephemeral_1h_input_tokens: int = 0


class _Usage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation: _CacheCreation | None = None


class _Message(msgspec.Struct):
    """The part of a Messages API response an Answer needs (unknown fields are skipped)."""

    model: str = ""
    content: list[_Block] = []
    stop_reason: str | None = None
    usage: _Usage = msgspec.field(default_factory=_Usage)


_decode_message = msgspec.json.Decoder(_Message).decode


def map_error(exc: anthropic.AnthropicError, auth_pause_s: float) -> Exception:
    """The pipeline error for an SDK error (by class and status, never by text)."""
    if isinstance(exc, anthropic.APITimeoutError):
        return TransientError("claude: request timed out")
    if isinstance(exc, anthropic.APIConnectionError):
        cause = type(exc.__cause__).__name__ if exc.__cause__ else "no detail"
        return TransientError(f"claude: connection error ({cause})")
    if not isinstance(exc, anthropic.APIStatusError):
        # A malformed response (APIResponseValidationError) or an SDK-side problem.
        return TransientError(f"claude: {type(exc).__name__}")
    status = exc.status_code
    text = _describe(exc)
    if status in _AUTH:
        return AuthError(text, pause_s=auth_pause_s)
    if status >= 500 or status in _RETRYABLE_4XX:
        return TransientError(text, retry_after_s=retry_after_s(exc.response.headers))
    return PermanentError(text)


def retry_after_s(headers: httpx2.Headers) -> float | None:
    """Seconds to wait from `retry-after-ms`, else `retry-after` (seconds or an HTTP date)."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _describe(exc: anthropic.APIStatusError) -> str:
    """Status, error type, the API's own message and the request id (no key, no prompt)."""
    kind = exc.type or "error"
    detail = exc.api_message or f"HTTP {exc.status_code}"
    text = f"claude {exc.status_code} {kind}: {detail}"
    if exc.request_id:
        text += f" (request-id {exc.request_id})"
    return text[:_MAX_MESSAGE_CHARS]
