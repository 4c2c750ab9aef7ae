"""OTLP/HTTP for `otlp_sender`: protobuf bodies over one kept-alive `http.client` connection."""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.client
import ssl
import time
from email.utils import parsedate_to_datetime
from urllib.parse import unquote, urlsplit

from google.protobuf.message import DecodeError  # type: ignore[import-untyped,unused-ignore]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from observability.otlp_sender import PREFIX, Attempt, RetryingSender, Settings, log_partial_success
from pipeline.runtime.errors import ConfigError

__all__ = ["HttpSender"]

_RETRYABLE_HTTP = frozenset({429, 502, 503, 504})


class HttpSender(RetryingSender):
    """OTLP/HTTP with protobuf bodies over one kept-alive `http.client` connection.

    The standard library's client: with one request per batch its fixed cost is the sender's
    cost, and it spends a quarter of the CPU per request that httpx does (measured: 0.21 vs
    0.77 ms for a 512-span batch). The timeout bounds each socket operation.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.endpoint, settings.timeout_s)
        url = urlsplit(settings.endpoint)
        self._https = url.scheme == "https"
        self._host = url.hostname or "localhost"
        self._port = url.port
        self._path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._gzip = settings.gzip
        self._headers = {**settings.headers, "content-type": "application/x-protobuf"}
        if settings.gzip:
            self._headers["content-encoding"] = "gzip"
        if url.username is not None and "authorization" not in self._headers:
            credentials = f"{unquote(url.username)}:{unquote(url.password or '')}".encode()
            self._headers["authorization"] = f"Basic {base64.b64encode(credentials).decode()}"
        context = _ssl_context(settings) if self._https else None
        self._ssl = ssl.create_default_context() if context is True else context or None
        self._conn: http.client.HTTPConnection | None = None

    def _body(self, payload: bytes) -> bytes:
        return gzip.compress(payload, compresslevel=6) if self._gzip else payload

    def _attempt(self, body: bytes, timeout_s: float) -> Attempt:
        # A kept-alive connection the collector has since closed fails at once: one retry on
        # a new connection, before counting it as a failed attempt.
        for fresh in (self._conn is None, True):
            conn = self._connection(timeout_s)
            try:
                conn.request("POST", self._path, body=body, headers=self._headers)
                response = conn.getresponse()
                content = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                if fresh or not isinstance(exc, _STALE):
                    return Attempt(ok=False, retryable=True, reason=f"{type(exc).__name__}: {exc}")
                continue
            if response.will_close:
                self._drop_connection()
            return _http_outcome(response, content)
        raise AssertionError("unreachable")

    def _connection(self, timeout_s: float) -> http.client.HTTPConnection:
        conn = self._conn
        if conn is None:
            if self._https:
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=timeout_s,
                                                   context=self._ssl)  # fmt: skip
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout_s)
            self._conn = conn
        else:
            conn.timeout = timeout_s
            if conn.sock is not None:
                conn.sock.settimeout(timeout_s)
        return conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _close(self) -> None:
        self._drop_connection()


#: Errors of a kept-alive connection the server closed while it was idle.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def _http_outcome(response: http.client.HTTPResponse, content: bytes) -> Attempt:
    status = response.status
    if 200 <= status < 300:
        with contextlib.suppress(DecodeError):  # a malformed success is still a success
            log_partial_success(ExportTraceServiceResponse.FromString(content))
        return Attempt(ok=True)
    return Attempt(ok=False, retryable=status in _RETRYABLE_HTTP,
                    wait_s=_retry_after_s(response.getheader("retry-after")),
                    reason=f"HTTP {status}")  # fmt: skip


def _ssl_context(settings: Settings) -> ssl.SSLContext | bool:
    """A context for a CA file or client certificate; `True` (the default trust) without."""
    ca, cert, key = settings.ca_file, settings.client_cert_file, settings.client_key_file
    if ca is None and cert is None:
        return True
    try:
        context = ssl.create_default_context(cafile=ca[1] if ca else None)  # only this CA
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(ca[0] if ca else f"{PREFIX}CERTIFICATE", f"cannot load: {exc}") from None
    if cert is not None:
        try:
            context.load_cert_chain(cert[1], key[1] if key else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(cert[0], f"cannot load it (or its key): {exc}") from None
    return context


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds from now (delay-seconds or an HTTP-date), None if absent or bad."""
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None
