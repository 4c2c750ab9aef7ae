"""Turning metrics on in a worker: the Prometheus endpoint, OTLP export, the queue poll.

Off unless asked for: `pipeline worker --metrics-port N` (or `[metrics] port`) serves
`http://<host>:N/metrics`; OTLP export starts when `OTEL_METRICS_EXPORTER` names `otlp` or
`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` is set. A bare `OTEL_EXPORTER_OTLP_ENDPOINT` is not
enough: it often points at a trace-only backend (Jaeger), which would refuse every export.
The exporter itself reads the rest of the standard variables (endpoint, headers, interval).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.claude.settings import Settings
from pipeline.runtime.errors import ConfigError
from pipeline.runtime.keys import Keys
from pipeline.runtime.stage import App

if TYPE_CHECKING:  # OpenTelemetry is imported only when metrics are on (the [otlp] extra)
    from wsgiref.simple_server import WSGIServer

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader
    from prometheus_client import CollectorRegistry
    from redis.asyncio import Redis

    from observability.metrics import PipelineMetrics
    from observability.queues import QueuePoller

log = logging.getLogger(__name__)

SCOPE = "claude-pipeline"


def otlp_metrics_wanted(environ: Mapping[str, str]) -> bool:
    """True when the standard variables ask for OTLP metrics (see the module docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip() for e in environ.get("OTEL_METRICS_EXPORTER", "").lower().split(",")}
    if "none" in exporters:
        return False
    return "otlp" in exporters or bool(environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))


@dataclass
class WorkerMetrics:
    """What a worker started for metrics; `run` polls the queues, `shutdown` stops it all."""

    metrics: PipelineMetrics
    poller: QueuePoller
    provider: MeterProvider
    port: int | None = None  # the bound scrape port (useful with port 0)
    _server: WSGIServer | None = None
    _undo: list[Callable[[], None]] = field(default_factory=list)
    _closed: bool = False

    async def run(self) -> None:
        await self.poller.run()

    def shutdown(self) -> None:
        """Flush the OTLP exporter (if any) and stop serving scrapes; idempotent."""
        if self._closed:
            return
        self._closed = True
        for undo in self._undo:
            undo()
        try:
            self.provider.shutdown()
        except Exception as exc:
            log.warning("metrics: shutdown failed: %r", exc)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def start_metrics(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    app: App,
    *,
    port: int | None,
    environ: Mapping[str, str] | None = None,
) -> WorkerMetrics | None:
    """Build the instruments and start what was asked for; None when nothing was.

    Args:
        port: serve Prometheus scrapes here (0: any free port); None: no endpoint.
        environ: the `OTEL_*` variables (default: the process environment).

    Raises:
        ConfigError: the `[otlp]` extra is missing, or the port cannot be bound.
    """
    otlp = otlp_metrics_wanted(os.environ if environ is None else environ)
    if port is None and not otlp:
        return None
    try:
        from observability.metrics import PipelineMetrics, meter_provider
        from observability.queues import QueuePoller
        from pipeline.claude.call_report import observe_calls
    except ImportError as exc:
        raise ConfigError(
            "metrics", f"metrics need the otlp extra: pip install 'claude-pipeline[otlp]' ({exc})"
        ) from None
    from prometheus_client import CollectorRegistry

    readers: list[MetricReader] = []
    registry = CollectorRegistry(auto_describe=True)  # ours, not prometheus_client's global
    if port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers.append(PrometheusMetricReader(registry=registry, scope_info_enabled=False))
    if otlp:
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(_otlp_exporter(environ or os.environ)))
    provider = meter_provider(readers)
    meter = provider.get_meter(SCOPE)
    metrics = PipelineMetrics(meter, looked_up=lambda request: _looked_up(settings, request))
    poller = QueuePoller(redis, keys, app, settings.metrics.poll_s)
    poller.register(meter)
    server: WSGIServer | None = None
    if port is not None:
        for collector in metrics.collectors():
            registry.register(collector)
        server = _serve(registry, settings.metrics.host, port)
        port = server.server_port
    started = WorkerMetrics(metrics, poller, provider, port, server)
    started._undo.append(observe_calls(metrics.observe_call))
    where = f"scrape http://{settings.metrics.host}:{port}/metrics" if port is not None else ""
    log.info("metrics on: %s", ", ".join(filter(None, [where, "OTLP export" if otlp else ""])))
    return started


def _looked_up(settings: Settings, request: object) -> bool:
    """cache-check's own condition for a cache lookup (a miss counts only then)."""
    from pipeline.claude.task import Request

    return (
        isinstance(request, Request) and request.cache and settings.cache.ttl_for(request.type) > 0
    )


def _serve(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Serve `registry` at http://host:port/metrics from a thread."""
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(port, host, registry)
    except OSError as exc:
        raise ConfigError("metrics.port", f"cannot serve metrics on {host}:{port}: {exc}") from None
    return server


def _otlp_exporter(environ: Mapping[str, str]) -> MetricExporter:
    """gRPC unless the protocol variables say `http/protobuf` (the Python SDK's default)."""
    protocol = environ.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if protocol.strip().lower().startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpExporter,
        )

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter()


__all__ = ["WorkerMetrics", "otlp_metrics_wanted", "start_metrics"]
