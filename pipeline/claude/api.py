"""The Claude adapter: the only module that imports `anthropic`.

It builds the client (aiohttp transport, pool sized to the stage's concurrency, no SDK retries:
the runtime retries durably, the "Retries are durable" guarantee), makes one Messages call, and
maps every SDK error onto the pipeline's tree (STYLE rule 7) so the runtime can decide by class.
Messages it raises carry the status, the API's error text and the request id; never the API key,
never the prompt.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import anthropic
import httpx2
import msgspec

from pipeline.claude.content import split_content
from pipeline.claude.long_calls import streams
from pipeline.claude.settings import ClaudeSettings
from pipeline.claude.stream import StreamBroken, assemble
from pipeline.claude.task import Answer, Routed, Usage
from pipeline.runtime.calls import CallReport
from pipeline.runtime.errors import AuthError, PermanentError, TransientError

__all__ = [
    "CallObserver",
    "answer_of",
    "call",
    "make_client",
    "map_error",
    "retry_after_s",
]

#: Receives each call's report (the caller's: it settles the rate limiter and hands the
#: report to the worker's hooks).
CallObserver = Callable[[CallReport], None]

log = logging.getLogger(__name__)

#: Statuses worth trying again besides 429 and 5xx (the SDK's own retry policy agrees).
_RETRYABLE_4XX = frozenset({408, 409, 429, 499})
#: Account-wide refusals: every call would fail alike, so pause rather than dead-letter.
_AUTH = frozenset({401, 402, 403})
_MAX_MESSAGE_CHARS = 500
#: Error events mid-stream worth a retry (their HTTP twins are 529, 500, 429).
_RETRYABLE_STREAM_ERRORS = frozenset({"overloaded_error", "api_error", "rate_limit_error"})
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
    settings: ClaudeSettings | None = None,
) -> Answer:
    """One Messages call for `routed`; the Answer's `attempts` is left for the caller.

    Every parameter of the request is sent as given (`Request.params` as body fields the SDK
    does not interpret, so one it does not know yet goes too); the answer keeps the whole
    reply (content blocks, stop sequence, usage, message and request ids). Long calls stream
    (`streams`), with `settings.stream_idle_timeout_s` bounding the wait for each event and
    `stream_timeout_s` the whole call. `on_report` receives this call's CallReport, in this
    task (so a tracer sees the stage's span current); nothing is built without it.

    Raises:
        TransientError: 429, 5xx/529, timeouts, connection errors (retry_after_s from headers),
            a stream cut or broken by an error event (overloaded, api error).
        PermanentError: the request is wrong (400, 404, 413, 422, …).
        AuthError: credentials missing or refused (401/402/403), pausing `auth_pause_s`.
    """
    if client.api_key is None and client.auth_token is None and client.credentials is None:
        raise AuthError("claude: no API key (set ANTHROPIC_API_KEY)", pause_s=auth_pause_s)
    settings = settings or ClaudeSettings()
    extra = routed.body()  # what the SDK does not interpret goes as body fields, untouched
    args: dict[str, Any] = {
        "model": extra.pop("model"),
        "max_tokens": extra.pop("max_tokens"),
        "messages": extra.pop("messages"),
        "system": extra.pop("system", anthropic.omit),
        "extra_body": extra or None,  # temperature too: SDK 2.x dropped the keyword
    }
    streamed = streams(routed, settings)
    started_ns = time.time_ns()
    status, headers = 0, None
    try:
        # The raw body, decoded by msgspec into just the fields we keep: the SDK's pydantic
        # models cost CPU and long-lived objects (GC work) at thousands of calls in flight.
        if streamed:
            reply, status, headers = await _streamed(client, args, settings)
        else:
            raw = await client.messages.with_raw_response.create(**args)
            status, headers = raw.http_response.status_code, raw.headers
            reply = _decode_message(await raw.read())
        content, output = split_content(bytes(reply.content))
    except anthropic.AnthropicError as exc:
        error = map_error(exc, auth_pause_s)
        if on_report is not None:
            status = exc.status_code if isinstance(exc, anthropic.APIStatusError) else 0
            headers = exc.response.headers if isinstance(exc, anthropic.APIStatusError) else None
            _report(on_report, _failed(routed, started_ns, status, error, headers))
        raise error from None
    except httpx2.TransportError as exc:
        # Raised while a stream is read (the SDK wraps only what happens before): a cut
        # connection, an idle timeout between events.
        error = _transport(exc)
        if on_report is not None:
            _report(on_report, _failed(routed, started_ns, status, error, headers))
        raise error from None
    except (msgspec.DecodeError, msgspec.ValidationError, StreamBroken) as exc:
        error = _broken(exc, headers)
        if on_report is not None:
            _report(on_report, _failed(routed, started_ns, status, error, headers))
        raise error from None
    ended_ns = time.time_ns()
    answer = _answer(
        reply, content, output, routed,
        request_id=(headers.get("request-id") if headers is not None else None) or "",
        call_ms=(ended_ns - started_ns) // 1_000_000,
    )  # fmt: skip
    if on_report is not None:
        _report(
            on_report,
            CallReport(
                family=routed.family,
                request_model=routed.model,
                response_model=answer.model,
                max_tokens=routed.max_tokens,
                status=status,
                started_ns=started_ns,
                ended_ns=ended_ns,
                usage=answer.usage,
                error_type=None,
                headers=headers,
            ),
        )
    return answer


def answer_of(message: bytes, routed: Routed) -> Answer:
    """The Answer a message JSON (a batch's result) gives, as a plain call's would.

    Raises:
        msgspec.DecodeError, msgspec.ValidationError: not a message.
    """
    reply = _decode_message(message)
    content, output = split_content(bytes(reply.content))
    return _answer(reply, content, output, routed, request_id="", call_ms=0)


def _answer(
    reply: _Message, content: str, output: str, routed: Routed, *, request_id: str, call_ms: int
) -> Answer:
    usage = _decode_usage(reply.usage)
    return Answer(
        request=routed.request,
        model=reply.model or routed.model,
        output=output,
        content=content,
        stop_reason=reply.stop_reason or "",
        stop_sequence=reply.stop_sequence,
        usage=Usage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_creation_input_tokens=usage.cache_creation_input_tokens or 0,
            cache_read_input_tokens=usage.cache_read_input_tokens or 0,
            cache_creation_1h_input_tokens=(
                usage.cache_creation.ephemeral_1h_input_tokens if usage.cache_creation else 0
            ),
            server_tool_requests=sum((usage.server_tool_use or {}).values()),
            batch=usage.service_tier == "batch",
        ),
        api_usage=bytes(reply.usage).decode(),
        message_id=reply.id,
        request_id=request_id,
        call_ms=call_ms,
    )


async def _streamed(
    client: anthropic.AsyncAnthropic, args: dict[str, Any], settings: ClaudeSettings
) -> tuple[_Message, int, httpx2.Headers]:
    """The call as a stream, read whole within `stream_timeout_s` and assembled."""
    timeout = httpx2.Timeout(
        settings.stream_idle_timeout_s,
        connect=min(_CONNECT_TIMEOUT_S, settings.stream_idle_timeout_s),
    )
    try:
        async with asyncio.timeout(settings.stream_timeout_s):
            async with client.messages.with_streaming_response.create(
                **args, stream=True, timeout=timeout
            ) as response:
                body = await response.read()
                status, headers = response.http_response.status_code, response.headers
    except TimeoutError:
        raise anthropic.APITimeoutError(request=None) from None  # type: ignore[arg-type]
    message = assemble(body)
    reply = _Message(
        id=message.id,
        model=message.model,
        content=msgspec.Raw(message.content),
        stop_reason=message.stop_reason,
        stop_sequence=message.stop_sequence,
        usage=msgspec.Raw(message.usage),
    )
    return reply, status, headers


def _transport(exc: httpx2.TransportError) -> TransientError:
    if isinstance(exc, httpx2.TimeoutException):
        return TransientError("claude: request timed out (no stream event within the idle timeout)")
    return TransientError(f"claude: connection error mid-stream ({type(exc).__name__})")


def _broken(exc: Exception, headers: httpx2.Headers | None) -> Exception:
    """The pipeline error for a reply that is not a whole message: retried, except an error
    event the API would answer alike the next time (e.g. `invalid_request_error`)."""
    request_id = headers.get("request-id") if headers is not None else None
    suffix = f" (request-id {request_id})" if request_id else ""
    if isinstance(exc, StreamBroken):
        if exc.error_type is not None and exc.error_type not in _RETRYABLE_STREAM_ERRORS:
            return PermanentError(f"{exc}{suffix}"[:_MAX_MESSAGE_CHARS])
        return TransientError(f"{exc}{suffix}"[:_MAX_MESSAGE_CHARS])
    return TransientError(f"claude: malformed response ({exc}){suffix}"[:_MAX_MESSAGE_CHARS])


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


class _CacheCreation(msgspec.Struct):
    ephemeral_5m_input_tokens: int = 0
    ephemeral_1h_input_tokens: int = 0


class _Usage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation: _CacheCreation | None = None
    server_tool_use: dict[str, int] | None = None
    service_tier: str | None = None


class _Message(msgspec.Struct):
    """A Messages API response: what an Answer reads, the rest (content, usage) kept raw."""

    id: str = ""
    model: str = ""
    content: msgspec.Raw = msgspec.Raw(b"[]")
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: msgspec.Raw = msgspec.Raw(b"{}")


_decode_message = msgspec.json.Decoder(_Message).decode
_decode_usage = msgspec.json.Decoder(_Usage).decode


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
