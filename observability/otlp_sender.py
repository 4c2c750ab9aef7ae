"""Send OTLP trace requests that are already bytes, configured as the OTel SDK exporters are.

Why: the pipeline encodes its spans straight into serialized `ExportTraceServiceRequest`s (the
SDK's exporters cost ~40 µs a span to encode) and the SDK's exporters take only SDK spans. This
is the transport alone, read from the variables an operator already sets for the Python SDK
(opentelemetry-exporter-otlp 1.45): the settings and the retry loop here, one request per
protocol in `otlp_http` and `otlp_grpc`. Each `OTEL_EXPORTER_OTLP_TRACES_<X>` wins over
`OTEL_EXPORTER_OTLP_<X>`; an empty value counts as unset.

- `PROTOCOL`: `grpc` (the default) or `http/protobuf`.
- `ENDPOINT`: HTTP takes the traces variable as the full URL, or appends `/v1/traces` to the
  generic one (default `http://localhost:4318/v1/traces`). gRPC takes host:port from either
  (default `http://localhost:4317`).
- `INSECURE` (gRPC only): as the SDK decides, an `https` URL is TLS; otherwise
  `INSECURE=true|false` decides if set; otherwise an `http` URL is plaintext and a URL without a
  scheme is TLS. (The SDK lets `INSECURE=false` turn an `http` URL into TLS; so does this.)
- `HEADERS`: `k=v,k2=v2`, URL-decoded and stripped, keys lower-cased; a malformed pair is skipped
  with a warning that never shows a value.
- `TIMEOUT`: seconds per request, a float, default 10. The specification says milliseconds, but
  the Python SDK reads seconds (opentelemetry-python#4044), so `10000` means what it means there.
  `send(timeout_s)` bounds the whole send, retries included.
- `COMPRESSION`: `gzip` or `none` (the default).
- `CERTIFICATE` (CA file), `CLIENT_KEY` and `CLIENT_CERTIFICATE` (mTLS), for both protocols.

Retries (OTLP specification): HTTP 429, 502, 503, 504 and transport errors (refused, reset,
timed out); gRPC CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE, DATA_LOSS, and
RESOURCE_EXHAUSTED only when the server sends RetryInfo. The wait is jittered exponential backoff,
but never shorter than the server's Retry-After or RetryInfo, and no retry starts when its wait
would end past the budget. gRPC is imported only when it is the protocol.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from pipeline.runtime.errors import ConfigError

__all__ = ["OtlpSender", "sender_from_env"]
# For the transports (otlp_http, otlp_grpc): Settings, Attempt, RetryingSender,
# log_partial_success, read_file, PREFIX.

log = logging.getLogger(__name__)

PREFIX = "OTEL_EXPORTER_OTLP_"
_DEFAULT_TIMEOUT_S = 10.0
_FIRST_BACKOFF_S = 0.25
_MAX_BACKOFF_S = 5.0
_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")

#: A file a variable names: (variable, path).
_File = tuple[str, str]


class OtlpSender(Protocol):
    """Sends serialized `ExportTraceServiceRequest`s to one collector."""

    endpoint: str  # for log messages: never holds headers or URL credentials

    def send(self, payload: bytes, timeout_s: float) -> bool:
        """Whether the collector took `payload`, retrying transient failures within `timeout_s`."""
        ...

    def close(self) -> None:
        """Release the connection; a send waiting to retry gives up."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    endpoint: str
    headers: dict[str, str]
    timeout_s: float
    gzip: bool
    ca_file: _File | None
    client_key_file: _File | None
    client_cert_file: _File | None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One request's outcome. `wait_s` is the server's Retry-After / RetryInfo, if any."""

    ok: bool
    retryable: bool = False
    wait_s: float | None = None
    reason: str = ""


def sender_from_env(environ: Mapping[str, str] = os.environ) -> OtlpSender:
    """A sender configured by the `OTEL_EXPORTER_OTLP_*` variables (see the module docstring).

    Raises:
        ConfigError: a variable is malformed (named as `field`), or a TLS file is unreadable.
    """
    name, protocol = _lookup(environ, "PROTOCOL")
    protocol = (protocol or "grpc").lower()
    if protocol == "http/protobuf":
        from observability.otlp_http import HttpSender

        return HttpSender(_http_settings(environ))
    if protocol == "grpc":
        from observability.otlp_grpc import GrpcSender  # grpc is imported only for gRPC

        return GrpcSender(*_grpc_settings(environ))
    raise ConfigError(name, f"{protocol!r} is not one of grpc, http/protobuf")


def _backoff_s(retry: int) -> float:
    """The wait before retry number `retry` (0-based): doubling from 0.25 s to 5 s, ±20 %."""
    return min(_FIRST_BACKOFF_S * 2.0**retry, _MAX_BACKOFF_S) * random.uniform(0.8, 1.2)


# --- Reading the variables ---------------------------------------------------------------


def _lookup(environ: Mapping[str, str], suffix: str) -> tuple[str, str | None]:
    """The variable that sets `suffix` (the traces one first) and its stripped value."""
    for name in (f"{PREFIX}TRACES_{suffix}", f"{PREFIX}{suffix}"):
        if value := environ.get(name, "").strip():
            return name, value
    return f"{PREFIX}{suffix}", None


def _common_settings(environ: Mapping[str, str], endpoint: str) -> Settings:
    client_key_file = _file(*_lookup(environ, "CLIENT_KEY"))
    client_cert_file = _file(*_lookup(environ, "CLIENT_CERTIFICATE"))
    if client_key_file and not client_cert_file:
        raise ConfigError(client_key_file[0], "is set without a CLIENT_CERTIFICATE")
    return Settings(
        endpoint=endpoint,
        headers=_headers(*_lookup(environ, "HEADERS")),
        timeout_s=_timeout_s(*_lookup(environ, "TIMEOUT")),
        gzip=_gzip(*_lookup(environ, "COMPRESSION")),
        ca_file=_file(*_lookup(environ, "CERTIFICATE")),
        client_key_file=client_key_file,
        client_cert_file=client_cert_file,
    )


def _file(name: str, path: str | None) -> _File | None:
    return None if path is None else (name, path)


def _http_settings(environ: Mapping[str, str]) -> Settings:
    name, url = _lookup(environ, "ENDPOINT")
    if url is None:
        url = "http://localhost:4318/v1/traces"
    elif name == f"{PREFIX}ENDPOINT":  # the generic one is a base URL
        url = url.removesuffix("/") + "/v1/traces"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(name, "is not an http:// or https:// URL")
    return _common_settings(environ, url)


def _grpc_settings(environ: Mapping[str, str]) -> tuple[Settings, bool]:
    """The settings, and whether the channel is plaintext (the SDK's rule, module docstring)."""
    url = _lookup(environ, "ENDPOINT")[1] or "http://localhost:4317"
    scheme = urlsplit(url).scheme
    insecure = _lookup(environ, "INSECURE")[1]
    if scheme == "https":
        plaintext = False
    elif insecure is not None:
        plaintext = insecure.lower() == "true"
    else:
        plaintext = scheme == "http"
    return _common_settings(environ, url), plaintext


def _headers(name: str, raw: str | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    for number, pair in enumerate((raw or "").split(","), start=1):
        if not pair.strip():
            continue
        key, equals, value = pair.partition("=")
        key, value = unquote(key).strip().lower(), unquote(value).strip()
        if not equals or not _HEADER_KEY.fullmatch(key) or not _HEADER_VALUE.fullmatch(value):
            log.warning("%s: header %d is not key=value (URL-encoded); skipped", name, number)
            continue
        headers[key] = value
    return headers


def _timeout_s(name: str, raw: str | None) -> float:
    if raw is None:
        return _DEFAULT_TIMEOUT_S
    try:
        timeout_s = float(raw)
    except ValueError:
        timeout_s = math.nan
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ConfigError(name, f"{raw!r} is not a positive number of seconds")
    return timeout_s


def _gzip(name: str, raw: str | None) -> bool:
    value = (raw or "none").lower()
    if value not in ("gzip", "none"):
        raise ConfigError(name, f"{raw!r} is not one of gzip, none")
    return value == "gzip"


def read_file(file: _File | None) -> bytes | None:
    if file is None:
        return None
    name, path = file
    try:
        with open(path, "rb") as opened:
            return opened.read()
    except OSError as exc:
        raise ConfigError(name, f"cannot read {path!r}: {exc.strerror}") from None


def _redacted(url: str) -> str:
    """`url` without user:password (the one place a URL may carry a secret)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


# --- Sending -----------------------------------------------------------------------------


class RetryingSender:
    """The retry loop both transports share; a subclass makes one attempt.

    `send` is called from one thread at a time; `close` may come from another while it runs:
    it ends a retry wait at once, and the transport is released when the attempt in flight
    (bounded by the per-request timeout) is over, never under it.
    """

    def __init__(self, endpoint: str, request_timeout_s: float) -> None:
        self.endpoint = _redacted(endpoint)
        self._request_timeout_s = request_timeout_s
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sending = False
        self._released = False

    def send(self, payload: bytes, timeout_s: float) -> bool:
        """Whether the collector took `payload`, retrying transient failures within `timeout_s`."""
        with self._lock:
            self._sending = True
        try:
            return self._send(payload, timeout_s)
        finally:
            with self._lock:
                self._sending = False
                if self._closed.is_set():
                    self._release()

    def close(self) -> None:
        """Release the connection; a send waiting to retry gives up."""
        with self._lock:
            self._closed.set()
            if not self._sending:
                self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._close()

    def _send(self, payload: bytes, timeout_s: float) -> bool:
        started = time.monotonic()
        deadline = started + timeout_s
        body = self._body(payload)
        attempt = Attempt(ok=False, reason="no time to send")
        for retry in itertools.count():
            remaining_s = deadline - time.monotonic()
            if self._closed.is_set():
                attempt = Attempt(ok=False, reason="the sender is closed")
            if self._closed.is_set() or remaining_s <= 0:
                break
            attempt = self._attempt(body, min(self._request_timeout_s, remaining_s))
            if attempt.ok:
                return True
            if not attempt.retryable:
                log.warning("OTLP export to %s refused: %s", self.endpoint, attempt.reason)
                return False
            wait_s = max(_backoff_s(retry), attempt.wait_s or 0.0)
            if time.monotonic() + wait_s >= deadline:
                break
            log.debug("OTLP export to %s failed (%s); retrying in %.2fs",
                      self.endpoint, attempt.reason, wait_s)  # fmt: skip
            self._closed.wait(wait_s)
        log.warning("OTLP export to %s given up after %.1fs: %s",
                    self.endpoint, time.monotonic() - started, attempt.reason)  # fmt: skip
        return False

    def _body(self, payload: bytes) -> bytes:
        return payload

    def _attempt(self, body: bytes, timeout_s: float) -> Attempt:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


def log_partial_success(response: ExportTraceServiceResponse) -> None:
    """A success may say some spans were rejected: worth a debug line, not a retry."""
    partial = response.partial_success
    if partial.rejected_spans or partial.error_message:
        log.debug("OTLP collector rejected %d spans: %s",
                  partial.rejected_spans, partial.error_message)  # fmt: skip
