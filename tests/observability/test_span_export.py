"""OtlpExport: batching, flushing at shutdown, dropping when full or refused.

The sender here records what it is given (the network is covered by test_otlp_sender.py and,
end to end from worker subprocesses, by test_tracing_otlp.py)."""

from __future__ import annotations

import logging
import threading

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from observability.otlp_encode import Encoder
from observability.span_export import BatchSettings, OtlpExport, batch_settings
from observability.spans import CONSUMER, SpanData, SpanShape
from tests.helpers.workers import wait_until

SHAPE = SpanShape("process p:tasks", CONSUMER, {"messaging.system": "redis"}, ("id",))


class Recorder:
    """An OtlpSender that keeps each request's span names, and can be held or refuse."""

    endpoint = "http://collector.test:4318/v1/traces"

    def __init__(self, accept: bool = True) -> None:
        self.requests: list[list[str]] = []
        self.accept = accept
        self.release = threading.Event()
        self.release.set()
        self.closed = False

    def send(self, payload: bytes, timeout_s: float) -> bool:
        self.release.wait(timeout_s)
        request = ExportTraceServiceRequest.FromString(payload)
        spans = request.resource_spans[0].scope_spans[0].spans
        self.requests.append([s.attributes[1].value.string_value for s in spans])
        return self.accept

    def close(self) -> None:
        self.closed = True


def span(n: int, trace_id: str = "4bf92f3577b34da6a3ce929d0e0e4736") -> SpanData:
    return SpanData(SHAPE, trace_id, f"{n + 1:016x}", None, 1_000 + n, (str(n),))


def export(sender: Recorder, **settings: float) -> OtlpExport:
    encoder = Encoder({"service.name": "test"}, "claude-pipeline", "0")
    return OtlpExport(encoder, sender, BatchSettings(**{"delay_s": 600.0, **settings}))  # type: ignore[arg-type]


def test_a_full_batch_is_sent_without_waiting_for_the_timer_and_the_rest_at_shutdown() -> None:
    sender = Recorder()
    out = export(sender, batch=4)  # the timer: 600 s
    for n in range(4):
        out.add(span(n))
    wait_until(lambda: sender.requests == [["0", "1", "2", "3"]], 5, what="the full batch")
    for n in range(4, 10):
        out.add(span(n))
    out.shutdown(5)
    assert all(len(request) <= 4 for request in sender.requests)
    assert [n for request in sender.requests for n in request] == [str(n) for n in range(10)]
    assert out.sent == 10 and out.dropped == 0 and sender.closed


def test_a_full_queue_drops_spans_instead_of_holding_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sender = Recorder()
    sender.release.clear()  # the collector is slow: the first batch is stuck in send
    out = export(sender, batch=2, max_queue=4)
    for n in range(2):
        out.add(span(n))
    wait_until(lambda: not out._queue, 5, what="the first batch taken")
    with caplog.at_level(logging.WARNING, "observability.span_export"):
        for n in range(2, 12):
            out.add(span(n))
    assert out.dropped == 6  # 4 queued behind the stuck batch, the other 6 dropped
    assert "queue is full" in caplog.text
    sender.release.set()
    out.shutdown(5)
    assert [n for request in sender.requests for n in request] == [str(n) for n in range(6)]


def test_spans_the_collector_refuses_are_counted_as_dropped() -> None:
    sender = Recorder(accept=False)
    out = export(sender)
    for n in range(3):
        out.add(span(n))
    out.shutdown(5)
    assert out.dropped == 3 and out.sent == 0


def test_a_span_with_a_malformed_trace_id_spoils_no_other(caplog: pytest.LogCaptureFixture) -> None:
    sender = Recorder()
    out = export(sender)
    out.add(span(0))
    out.add(span(1, trace_id="not hex at all, from a hand-made envelope"))
    out.add(span(2))
    with caplog.at_level(logging.WARNING, "observability.span_export"):
        out.shutdown(5)
    assert sender.requests == [["0", "2"]]
    assert "trace context is malformed" in caplog.text


def test_batch_settings_come_from_the_sdks_variables() -> None:
    assert batch_settings({}) == BatchSettings(5.0, 2048, 512, 30.0)
    environ = {"OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_BSP_MAX_QUEUE_SIZE": "10",
               "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "5", "OTEL_BSP_EXPORT_TIMEOUT": "x"}  # fmt: skip
    got = batch_settings(environ)
    assert got == BatchSettings(0.2, 10, 5, 30.0)
