"""The OTLP sender against real receivers, configured by `OTEL_*` variables only.

Each receiver is a real OTLP endpoint inside the test (a stdlib HTTP server decoding
`ExportTraceServiceRequest`s, a gRPC TraceService) that answers the requests in turn as its
`replies` say, then accepts.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped,unused-ignore]
import pytest
from google.rpc.error_details_pb2 import RetryInfo  # type: ignore[import-untyped,unused-ignore]
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from observability.otlp_sender import sender_from_env
from pipeline.runtime.errors import ConfigError

ExportRequest = trace_service_pb2.ExportTraceServiceRequest
ExportResponse = trace_service_pb2.ExportTraceServiceResponse
#: How each receiver answers a reply: (HTTP status, gRPC code); "throttled" also asks to wait.
ANSWERS = {
    "unavailable": (503, grpc.StatusCode.UNAVAILABLE),
    "invalid": (400, grpc.StatusCode.INVALID_ARGUMENT),
    "throttled": (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    "exhausted": (429, grpc.StatusCode.RESOURCE_EXHAUSTED),  # gRPC: without RetryInfo
}


def _payload() -> bytes:
    """A request of two spans, serialized as the pipeline's encoder would hand it over."""
    request = ExportRequest()
    scope_spans = request.resource_spans.add().scope_spans.add()
    for n, name in enumerate(["process cache-check", "chat claude-haiku"], start=1):
        scope_spans.spans.add(name=name, trace_id=bytes([n]) * 16, span_id=bytes([n]) * 8)
    payload: bytes = request.SerializeToString()
    return payload


SENT = ExportRequest.FromString(_payload())


@dataclass
class Collector:
    protocol: str = ""
    env: dict[str, str] = field(default_factory=dict)
    replies: list[str] = field(default_factory=list)
    wait_s: float = 0.0  # what "throttled" asks for
    delay_s: float = 0.0  # before each answer
    calls: int = 0
    requests: list[ExportRequest] = field(default_factory=list)  # decoded, those accepted
    headers: dict[str, str] = field(default_factory=dict)  # the last request's
    paths: list[str] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def receive(self, path: str, headers: dict[str, str], body: bytes) -> str:
        with self._changed:
            self.calls += 1
            self.paths.append(path)
            self.headers = {k.lower(): v for k, v in headers.items()}
            reply = self.replies.pop(0) if self.replies else "ok"
            self._changed.notify_all()
        self.stopping.wait(self.delay_s)
        if reply == "ok":
            with self._changed:
                self.requests.append(ExportRequest.FromString(body))
        return reply

    def wait_for_calls(self, n: int, timeout_s: float = 5.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.calls >= n, timeout_s)


def _http_collector(collector: Collector, tls: ssl.SSLContext | None = None) -> Callable[[], None]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            reply = collector.receive(self.path, dict(self.headers), body)
            status = ANSWERS[reply][0] if reply != "ok" else 200
            content = ExportResponse().SerializeToString() if status == 200 else b""
            self.send_response(status)
            if reply == "throttled":
                self.send_header("Retry-After", str(collector.wait_s))
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def handle(self) -> None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # client gave up
                super().handle()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    # A short poll: `shutdown` waits for it.
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    scheme = "https" if tls else "http"
    collector.protocol = "http"
    collector.env.update(
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"{scheme}://127.0.0.1:{server.server_port}",
    )
    return server.shutdown


def _grpc_collector(
    collector: Collector, tls: Any = None, options: tuple[tuple[str, Any], ...] = ()
) -> Callable[[], None]:
    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: ExportRequest, context: Any) -> ExportResponse:
            reply = collector.receive("", dict(context.invocation_metadata()),
                                      request.SerializeToString())  # fmt: skip
            if reply == "throttled":
                delay = RetryInfo()
                delay.retry_delay.FromNanoseconds(int(collector.wait_s * 1e9))
                context.set_trailing_metadata(
                    (("google.rpc.retryinfo-bin", delay.SerializeToString()),))  # fmt: skip
            if reply != "ok":
                context.abort(ANSWERS[reply][1], reply)
            return ExportResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call,unused-ignore]
        Service(), server
    )
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", tls)
    server.start()
    scheme = "https" if tls else "http"  # and no PROTOCOL: grpc is the default
    collector.protocol = "grpc"
    collector.env.update(OTEL_EXPORTER_OTLP_ENDPOINT=f"{scheme}://127.0.0.1:{port}")
    return lambda: server.stop(None)


STARTERS = {"http": _http_collector, "grpc": _grpc_collector}


@pytest.fixture(params=list(STARTERS))
def collector(request: pytest.FixtureRequest) -> Iterator[Collector]:
    started = Collector()
    stop = STARTERS[request.param](started)
    yield started
    started.stopping.set()
    stop()


def _send(env: dict[str, str], timeout_s: float = 5.0, payload: bytes | None = None) -> bool:
    sender = sender_from_env(env)
    try:
        return sender.send(_payload() if payload is None else payload, timeout_s)
    finally:
        sender.close()


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "observability.otlp_sender"]


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- Endpoints, headers, compression --------------------------------------------------


def test_spans_arrive_once_at_the_generic_endpoint(collector: Collector) -> None:
    assert _send({**collector.env, "OTEL_EXPORTER_OTLP_ENDPOINT":
                  collector.env["OTEL_EXPORTER_OTLP_ENDPOINT"] + "/"})  # fmt: skip
    assert collector.requests == [SENT]
    if collector.protocol == "http":  # /v1/traces appended (past the trailing slash)
        assert collector.paths == ["/v1/traces"]
        assert collector.headers["content-type"] == "application/x-protobuf"


def test_http_traces_endpoint_is_used_as_it_is() -> None:
    collector = Collector()
    stop = _http_collector(collector)
    try:
        base = collector.env["OTEL_EXPORTER_OTLP_ENDPOINT"]
        env = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
               "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
               "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{_dead_port()}",
               "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{base}/custom/traces"}  # fmt: skip
        assert _send(env)
    finally:
        stop()
    assert collector.paths == ["/custom/traces"] and collector.requests == [SENT]


def test_grpc_traces_endpoint_without_a_scheme_is_plaintext_when_insecure_says_so() -> None:
    collector = Collector()
    stop = _grpc_collector(collector)
    target = collector.env["OTEL_EXPORTER_OTLP_ENDPOINT"].removeprefix("http://")
    try:
        env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": target,
               "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true"}  # fmt: skip
        assert _send(env)
        # Without INSECURE, no scheme means TLS, which this plaintext receiver cannot speak.
        assert not _send({"OTEL_EXPORTER_OTLP_ENDPOINT": target}, timeout_s=0.5)
    finally:
        stop()
    assert collector.requests == [SENT]


def test_headers_arrive_decoded_and_malformed_ones_are_skipped_unseen(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    headers = "Authorization=Bearer%20s3cret, X-Tenant = acme ,no-equals-sign,=novalue%20key"
    with caplog.at_level(logging.WARNING, "observability.otlp_sender"):
        assert _send({**collector.env, "OTEL_EXPORTER_OTLP_HEADERS": headers})
    assert collector.headers["authorization"] == "Bearer s3cret"
    assert collector.headers["x-tenant"] == "acme"
    assert [r.getMessage() for r in _records(caplog)] == [
        f"OTEL_EXPORTER_OTLP_HEADERS: header {n} is not key=value (URL-encoded); skipped"
        for n in (3, 4)
    ]


def test_gzip_bodies_arrive(collector: Collector) -> None:
    assert _send({**collector.env, "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"})
    assert collector.requests == [SENT]
    if collector.protocol == "http":
        assert collector.headers["content-encoding"] == "gzip"


def test_grpc_gzip_is_really_compressed() -> None:
    """A receiver that accepts only uncompressed messages refuses what the sender sends."""
    collector = Collector()
    stop = _grpc_collector(collector, options=(("grpc.compression_enabled_algorithms_bitset", 1),))
    try:
        assert _send(collector.env)
        assert not _send({**collector.env, "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip"})
    finally:
        stop()
    assert collector.calls == 1


# --- Retries ---------------------------------------------------------------------------


def test_transient_failures_are_retried_and_the_spans_arrive_once(collector: Collector) -> None:
    collector.replies = ["unavailable", "unavailable"]
    assert _send(collector.env)
    assert collector.calls == 3
    assert collector.requests == [SENT]


def test_a_permanent_error_is_not_retried_and_logged_once_without_secrets(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    collector.replies = ["invalid"]
    env = {**collector.env, "OTEL_EXPORTER_OTLP_HEADERS": "authorization=s3cret"}
    with caplog.at_level(logging.DEBUG, "observability.otlp_sender"):
        assert not _send(env)
    assert collector.calls == 1
    (record,) = _records(caplog)
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "refused" in record.getMessage() and "s3cret" not in record.getMessage()


def test_the_servers_wait_is_honoured(collector: Collector) -> None:
    """Retry-After / RetryInfo: a short one is waited out; one past the budget ends the send."""
    collector.replies, collector.wait_s = ["throttled"], 0.05
    assert _send(collector.env)
    assert collector.calls == 2
    collector.replies, collector.wait_s = ["throttled"], 30
    started = time.monotonic()
    assert not _send(collector.env, timeout_s=3)
    assert collector.calls == 3 and time.monotonic() - started < 1


def test_grpc_resource_exhausted_without_retry_info_is_permanent() -> None:
    collector = Collector(replies=["exhausted"])
    stop = _grpc_collector(collector)
    try:
        assert not _send(collector.env)
    finally:
        stop()
    assert collector.calls == 1


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_a_dead_endpoint_gives_up_within_the_budget(
    protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{_dead_port()}"}  # fmt: skip
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG, "observability.otlp_sender"):
        assert not _send(env, timeout_s=1.0)
    assert time.monotonic() - started < 2.0
    *retries, gave_up = _records(caplog)
    assert retries and all("retrying" in r.getMessage() for r in retries)
    assert gave_up.levelno == logging.WARNING and "given up" in gave_up.getMessage()


def test_the_timeout_variable_is_seconds_per_request(collector: Collector) -> None:
    collector.delay_s = 0.2
    # 1 s per request: one slow answer is waited for (1 ms would time out and retry).
    assert _send({**collector.env, "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
    assert collector.calls == 1
    # 0.05 s per request: each attempt times out, and the budget allows a retry.
    assert not _send({**collector.env, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "0.05"},
                     timeout_s=0.5)  # fmt: skip
    assert collector.wait_for_calls(3)  # the server saw the retry


def test_close_ends_a_send_waiting_to_retry(collector: Collector) -> None:
    collector.replies = ["unavailable"] * 1000
    sender = sender_from_env(collector.env)
    outcome: list[object] = []

    def send() -> None:
        try:
            outcome.append(sender.send(_payload(), 30))
        except Exception as exc:  # surfaced by the assertion below
            outcome.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    assert collector.wait_for_calls(1)
    closed = time.monotonic()
    sender.close()
    thread.join(5)
    assert outcome == [False] and time.monotonic() - closed < 1


# --- Configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "10ms"),
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "zstd"),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem"),
    ],
)
def test_a_bad_variable_is_a_config_error_naming_it(variable: str, value: str) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4317", variable: value}
    with pytest.raises(ConfigError) as raised:
        sender_from_env(env)
    assert raised.value.field == variable


# --- TLS --------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_mutual_tls_with_the_certificate_variables(protocol: str, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_cert, client_cert = ca.issue_cert("127.0.0.1"), ca.issue_cert("client.example")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client_cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    client_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    collector = Collector()
    if protocol == "http":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_cert.configure_cert(context)
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
        stop = _http_collector(collector, tls=context)
    else:
        credentials = grpc.ssl_server_credentials(
            [(server_cert.private_key_pem.bytes(), server_cert.cert_chain_pems[0].bytes())],
            root_certificates=ca.cert_pem.bytes(), require_client_auth=True)  # fmt: skip
        stop = _grpc_collector(collector, tls=credentials)
    try:
        env = {
            **collector.env,
            "OTEL_EXPORTER_OTLP_CERTIFICATE": str(tmp_path / "ca.pem"),
            "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(tmp_path / "key.pem"),
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE": str(tmp_path / "cert.pem"),
        }
        assert _send(env)
    finally:
        stop()
    assert collector.requests == [SENT]


def test_http_keeps_its_connection_and_replaces_one_the_collector_closed() -> None:
    """Batches reuse one connection; when the collector has closed it while idle (as proxies
    and collectors do), the next batch goes out once, on a new one, and is not a failure."""
    connections: list[tuple[str, int]] = []  # the client's address: one per connection
    bodies: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            connections.append(self.client_address)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            # Every second request: hang up afterwards, without saying so in the reply.
            self.close_connection = len(bodies) % 2 == 0

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    sender = sender_from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                              "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})  # fmt: skip
    try:
        started = time.monotonic()
        assert all(sender.send(_payload(), 5) for _ in range(4))
        elapsed = time.monotonic() - started
    finally:
        sender.close()
        server.shutdown()
    assert len(bodies) == 4 and all(ExportRequest.FromString(b) == SENT for b in bodies)
    assert connections[0] == connections[1] and connections[2] == connections[3]
    assert connections[1] != connections[2]
    assert elapsed < 0.15  # no retry backoff (0.2 s at least): a stale connection is no failure
