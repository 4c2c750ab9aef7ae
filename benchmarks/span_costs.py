"""What one traced stage span costs, piece by piece, against the OpenTelemetry SDK's way.

    python benchmarks/span_costs.py

In this process, on the same machine in the same run: the worker-side life of a sampled
stage span (opened, current in the handler's context, handed off, finished), its OTLP
protobuf encoding and sending (512-span batches, to a keep-alive OTLP/HTTP sink in this
process), the entry cost when the trace is not sampled, and the same span made, ended and
encoded by the SDK (`tracer.start_span` with the same attributes, then the OTLP exporter's
`encode_spans`). Best of 7 repeats, CPU time of the calling thread; the last line is
`ours_us=<n> sdk_us=<n> ratio=<n>`.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind  # noqa: E402

from observability.otlp_encode import Encoder  # noqa: E402
from observability.otlp_sender import sender_from_env  # noqa: E402
from observability.spans import SpanData  # noqa: E402
from observability.tracing import Tracing, _ratio  # noqa: E402
from pipeline import App, Complete, Forward, Keys, Message, Outcome, Stage  # noqa: E402
from pipeline.runtime.wire import Envelope  # noqa: E402

BATCH = 512
SAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
UNSAMPLED = SAMPLED[:-2] + "00"


class Keep:
    """A SpanExport that only keeps the spans (what the export thread would take)."""

    def __init__(self) -> None:
        self.spans: collections.deque[SpanData] = collections.deque(maxlen=BATCH)

    def add(self, span: SpanData) -> None:
        self.spans.append(span)

    def shutdown(self, timeout_s: float) -> None:
        pass


def sink() -> str:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def best_us(work: Callable[[], object], per_call: int, calls: int = 40) -> float:
    """CPU microseconds per item: best of 7 repeats of `calls` calls of `per_call` items."""
    times = []
    for _ in range(7):
        start = time.thread_time()
        for _ in range(calls):
            work()
        times.append(time.thread_time() - start)
    return min(times) / (calls * per_call) * 1e6


def message(n: int, traceparent: str | None) -> Message:
    env = Envelope(v=1, task_id=f"1732650000000-{n}", fields={}, attempt=1, origin_ms=0,
                   enqueued_ms=0, traceparent=traceparent)  # fmt: skip
    return Message(env, f"1732650000000-{n}", "first", None, 1)


async def handler(msg: Message) -> Outcome:
    return Complete()


def main() -> None:
    app = App([Stage("first", "tasks", handler)])
    keep = Keep()
    tracing = Tracing(TracerProvider(), app, Keys("pipeline"), export=keep,
                      sample_root=_ratio(1 << 64))  # fmt: skip
    sampled = [message(n, SAMPLED) for n in range(BATCH)]
    unsampled = [message(n, UNSAMPLED) for n in range(BATCH)]
    roots = [message(n, None) for n in range(BATCH)]
    forward = Forward("second")

    def stage_spans() -> None:
        for msg in sampled:
            span = tracing.start(msg)
            assert span is not None
            span.task_context()
            span.handoff("forward", "second", None)
            span.finish(forward)

    def not_sampled() -> None:
        for msg in unsampled:
            tracing.start(msg)

    unsampled_roots = Tracing(TracerProvider(), app, Keys("pipeline"), export=keep,
                              sample_root=_ratio(0))  # fmt: skip

    def new_unsampled_traces() -> None:
        for msg in roots:
            span = unsampled_roots.start(msg)
            assert span is not None
            span.handoff("forward", "second", None)

    stage_spans()
    encoder = Encoder({"service.name": "span-costs"}, "claude-pipeline", "0")
    batch = list(keep.spans)
    payload = encoder.encode(batch)
    sender = sender_from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                              "OTEL_EXPORTER_OTLP_ENDPOINT": sink()})  # fmt: skip

    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("claude-pipeline")
    attributes = {"messaging.system": "redis", "messaging.operation.type": "process",
                  "messaging.destination.name": "pipeline:tasks",
                  "messaging.consumer.group.name": "first"}  # fmt: skip

    def sdk_spans() -> None:
        memory.clear()
        for msg in sampled:
            own = {"messaging.message.id": msg.entry_id,
                   "messaging.message.conversation_id": msg.task_id}  # fmt: skip
            span = tracer.start_span("process pipeline:tasks", kind=SpanKind.CONSUMER,
                                     attributes={**attributes, **own})  # fmt: skip
            span.end()

    sdk_spans()
    sdk_batch: tuple[ReadableSpan, ...] = memory.get_finished_spans()

    def send() -> None:
        sender.send(payload, 10)

    figures = {
        "ours: open, make current, hand off, finish": best_us(stage_spans, BATCH, 10),
        "ours: OTLP protobuf encoding": best_us(lambda: encoder.encode(batch), BATCH),
        "ours: OTLP/HTTP send (512-span batches)": best_us(send, BATCH),
        "SDK: start_span + end (in-memory processor)": best_us(sdk_spans, BATCH, 10),
        "SDK: OTLP exporter's encode_spans": best_us(
            lambda: encode_spans(sdk_batch).SerializeToString(), BATCH, 4
        ),
        "not sampled, a stage after the first": best_us(not_sampled, BATCH, 40),
        "not sampled, the first stage (new trace)": best_us(new_unsampled_traces, BATCH, 20),
    }
    for what, us in figures.items():
        print(f"{what:46s} {us:6.2f} us per span")
    ours = sum(us for what, us in figures.items() if what.startswith("ours"))
    sdk = sum(us for what, us in figures.items() if what.startswith("SDK"))
    print(f"sampled span, all in: ours {ours:.1f} us, the SDK's way {sdk:.1f} us "
          f"(+ its batch processor and send)")  # fmt: skip
    print(f"ours_us={ours:.2f} sdk_us={sdk:.2f} ratio={sdk / ours:.1f}")
    sender.close()


if __name__ == "__main__":
    main()
