"""Worker subprocesses export their spans over OTLP, configured only by `OTEL_*` variables.

The receivers are real OTLP endpoints inside the test: an HTTP server decoding
`ExportTraceServiceRequest` protobufs on /v1/traces, and a gRPC TraceService.
"""

from __future__ import annotations

import gzip
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from pipeline import Keys
from tests.conftest import StartFake
from tests.helpers.redis_server import free_port
from tests.helpers.workers import ROOT, Workers, wait_until

ExportRequest = trace_service_pb2.ExportTraceServiceRequest


@dataclass
class Received:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    events: list[str]


def _value(v: AnyValue) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


class Receiver:
    """Collects the spans of every ExportTraceServiceRequest it is sent."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self._lock = threading.Lock()

    def take(self, request: Any) -> None:
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received = Received(
                        service=str(resource.get("service.name")),
                        name=span.name,
                        kind=span.kind,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        events=[e.name for e in span.events],
                    )
                    with self._lock:
                        self.spans.append(received)

    def trace(self, trace_id: str) -> list[Received]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]


def _http_receiver(receiver: Receiver) -> tuple[str, Any]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            receiver.take(ExportRequest.FromString(body))
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server.shutdown


def _grpc_receiver(receiver: Receiver) -> tuple[str, Any]:
    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            receiver.take(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return f"http://127.0.0.1:{port}", lambda: server.stop(None)


@pytest.fixture(params=["http/protobuf", "grpc"])
def otlp(request: pytest.FixtureRequest) -> Iterator[tuple[Receiver, dict[str, str]]]:
    receiver = Receiver()
    start = _http_receiver if request.param == "http/protobuf" else _grpc_receiver
    endpoint, stop = start(receiver)
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": request.param,
        "OTEL_SERVICE_NAME": "traced-pipeline",
        # Nothing is exported on a timer during the test: what arrives was flushed at stop.
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
    }
    yield receiver, env
    stop()


def test_worker_subprocesses_export_one_trace_over_otlp(
    otlp: tuple[Receiver, dict[str, str]],
    start_fake: StartFake,
    fast_env: dict[str, str],
    prefix: str,
    rclient: redis.Redis,
    tmp_path: Path,
) -> None:
    receiver, otel_env = otlp
    fake = start_fake()
    env = {**fast_env, **otel_env, "ANTHROPIC_BASE_URL": fake.base_url,
           "ANTHROPIC_API_KEY": "good-key"}  # fmt: skip
    workers = Workers(env, tmp_path, app="stages:app")
    try:
        front = workers.start(["cache-check", "router"])
        back = workers.start(["claude-call", "store"])
        keys = Keys(prefix)
        task_id = rclient.xadd(keys.ingress, {"prompt": "trace me", "type": "classify"}).decode()
        wait_until(lambda: rclient.exists(keys.result(task_id)) == 1, 60, what="the result")
        trace_id = rclient.hget(keys.result(task_id), "trace_id").decode()  # type: ignore[union-attr]
        assert receiver.spans == []
        for proc in (front, back):
            proc.signal(signal.SIGTERM)
        for proc in (front, back):
            assert proc.wait(30) == 0, proc.log()[-3000:]
    finally:
        workers.stop_all()
    spans = receiver.trace(trace_id)
    by_name = {s.name: s for s in spans}
    streams = [keys.ingress, keys.stream("route"), keys.stream("call", "haiku"),
               keys.stream("store")]  # fmt: skip
    consumers = [by_name[f"process {stream}"] for stream in streams]
    assert [s.kind for s in consumers] == [Span.SpanKind.SPAN_KIND_CONSUMER] * 4
    assert consumers[0].parent_id == ""  # no traceparent from the producer: a new trace
    for before, after in itertools.pairwise(consumers):
        assert after.parent_id == before.span_id  # across the two processes too
    assert [s.attributes["messaging.consumer.group.name"] for s in consumers] == [
        "cache-check", "router", "claude-call", "store"]  # fmt: skip
    (chat,) = [s for s in spans if s.kind == Span.SpanKind.SPAN_KIND_CLIENT]
    assert chat.parent_id == consumers[2].span_id
    assert chat.attributes["gen_ai.provider.name"] == "anthropic"
    assert chat.attributes["gen_ai.usage.output_tokens"] > 0
    assert {s.service for s in spans} == {"traced-pipeline"}
    assert len(spans) == 5, [s.name for s in spans]


def test_without_otel_variables_nothing_of_opentelemetry_is_loaded() -> None:
    """Tracing is off unless configured, and costs users without it not even an import.

    (redis-py 8 imports the OpenTelemetry SDK itself when it is installed, so the check is
    on this project's tracing modules.)"""
    code = (
        "import sys, pipeline.cli.worker, pipeline.runtime.runner, pipeline.client, stages\n"
        "from observability import tracing_enabled\n"
        "print(tracing_enabled({}), tracing_enabled({'OTEL_SDK_DISABLED': 'true',"
        " 'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://x:4318'}),"
        " tracing_enabled({'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://x:4318'}),"
        " 'observability.tracing' in sys.modules, 'observability.propagation' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True)  # fmt: skip
    assert out.stdout.split() == ["False", "False", "True", "False", "False"]


def test_pipeline_submit_sends_a_producer_span_whose_context_is_the_entrys_traceparent(
    otlp: tuple[Receiver, dict[str, str]], fast_env: dict[str, str], prefix: str,
    rclient: redis.Redis,
) -> None:  # fmt: skip
    receiver, otel_env = otlp
    env = {**os.environ, **fast_env, **otel_env, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", "hello", "--type",
                          "classify"], cwd=ROOT, env=env, check=True, capture_output=True,
                         text=True)  # fmt: skip
    task_id = out.stdout.strip()
    ((entry_id, fields),) = rclient.xrange(Keys(prefix).ingress)
    assert fields[b"id"].decode() == task_id  # the client gives every task an id
    _, trace_id, span_id, flags = fields[b"traceparent"].decode().split("-")
    assert int(flags, 16) & 1
    (send,) = receiver.trace(trace_id)  # flushed before the command exited
    assert (send.name, send.kind) == (f"send {Keys(prefix).ingress}",
                                      Span.SpanKind.SPAN_KIND_PRODUCER)  # fmt: skip
    assert send.span_id == span_id and send.parent_id == ""
    assert send.attributes["messaging.message.id"] == entry_id.decode()
    assert send.attributes["messaging.message.conversation_id"] == task_id
    assert send.attributes["messaging.operation.type"] == "send"


def test_a_worker_whose_collector_is_down_still_stops_promptly(
    workers: Workers, prefix: str, rclient: redis.Redis
) -> None:
    """Spans that cannot be sent are dropped after a bounded wait, not retried for 30 s."""
    worker = workers.start(extra_env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nobody listens
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "600000",  # all spans wait for the flush at stop
    })  # fmt: skip
    keys = Keys(prefix)
    for n in range(20):
        rclient.xadd(keys.ingress, {"n": str(n)})
    wait_until(lambda: rclient.xlen(keys.done) >= 20, 30, what="20 results")
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(40) == 0
    # Unbounded, the exporter's retries take ~30 s. (25 s, not 5: a worker's own shutdown
    # now and then stalls until grace + 10 s, a cancellation lost in redis-py.)
    assert time.monotonic() - started < 25, worker.log()[-2000:]
    assert "spans not exported within 5s of stopping dropped" in worker.log()
