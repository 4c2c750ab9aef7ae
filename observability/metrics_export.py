"""Turning metrics on in a worker: the Prometheus endpoint, OTLP export, the queue poll.

Off unless asked for: `pipeline worker --metrics-port N` (or `[metrics] port`) serves
`http://<host>:N/metrics`; OTLP export starts when `OTEL_METRICS_EXPORTER` names `otlp` or
`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` is set. A bare `OTEL_EXPORTER_OTLP_ENDPOINT` is not
enough: it often points at a trace-only backend (Jaeger), which would refuse every export.
The exporter itself reads the rest of the standard variables (endpoint, headers, interval).
A `MeterProvider` the application set globally receives the same instruments, whatever the
variables say (its readers are the application's business).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.runtime.errors import ConfigError
from pipeline.runtime.keys import Keys
from pipeline.runtime.settings import BaseSettings
from pipeline.runtime.stage import App

if TYPE_CHECKING:  # OpenTelemetry is imported only when metrics are on (the [otlp] extra)
    from wsgiref.simple_server import WSGIServer

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from prometheus_client import CollectorRegistry
    from redis.asyncio import Redis

    from observability.metrics import PipelineMetrics
    from observability.queues import QueuePoller

log = logging.getLogger(__name__)


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
    provider: MeterProvider | None  # ours (None: only the application's receives them)
    port: int | None = None  # the bound scrape port (useful with port 0)
    _server: WSGIServer | None = None
    _closed: bool = False

    async def run(self) -> None:
        await self.poller.run()

    def shutdown(self) -> None:
        """Flush the OTLP exporter (if any) and stop serving scrapes; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.provider is not None:
            from observability.otel import close_meter_provider

            close_meter_provider(self.provider)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def start_metrics(
    settings: BaseSettings,
    redis: Redis,
    keys: Keys,
    app: App,
    *,
    port: int | None,
    service_name: str,
    looked_up: Callable[[object], bool] = lambda request: True,
    environ: Mapping[str, str] | None = None,
) -> WorkerMetrics | None:
    """Build the instruments and start what was asked for; None when nothing was.

    Args:
        port: serve Prometheus scrapes here (0: any free port); None: no endpoint.
        service_name: the resource's `service.name` unless `OTEL_*` name one.
        looked_up: whether cache-check looked a request up (a miss counts only then).
        environ: the `OTEL_*` variables (default: the process environment).

    Raises:
        ConfigError: the `[otlp]` extra is missing, or the port cannot be bound.
    """
    environ = os.environ if environ is None else environ
    otlp = otlp_metrics_wanted(environ)
    if port is None and not otlp and not _app_provider_set():
        return None
    try:
        from observability.metrics import PipelineMetrics, meter_provider
        from observability.otel import SCOPE, app_meter_provider, otlp_metric_exporter, version
        from observability.queues import QueuePoller
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

        readers.append(PeriodicExportingMetricReader(otlp_metric_exporter(environ)))
    app_provider = app_meter_provider()
    provider = meter_provider(readers, service_name) if readers else None
    providers = [p for p in (app_provider, provider) if p is not None]
    meters = [p.get_meter(SCOPE, version()) for p in providers]
    metrics = PipelineMetrics(meters, looked_up=looked_up)
    poller = QueuePoller(redis, keys, app, settings.metrics.poll_s)
    for meter in meters:
        poller.register(meter)
    server: WSGIServer | None = None
    if port is not None:
        for collector in metrics.collectors():
            registry.register(collector)
        server = _serve(registry, settings.metrics.host, port)
        port = server.server_port
    started = WorkerMetrics(metrics, poller, provider, port, server)
    where = f"scrape http://{settings.metrics.host}:{port}/metrics" if port is not None else ""
    app_set = "the application's MeterProvider" if app_provider is not None else ""
    found = filter(None, [where, "OTLP export" if otlp else "", app_set])
    log.info("metrics on: %s", ", ".join(found))
    return started


def _app_provider_set() -> bool:
    """Whether the application set a global MeterProvider (without importing OpenTelemetry
    when nothing has: then nobody can have)."""
    if "opentelemetry.sdk.metrics" not in sys.modules:
        return False
    from observability.otel import app_meter_provider

    return app_meter_provider() is not None


def _serve(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Serve `registry` at http://host:port/metrics from a thread."""
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(port, host, registry)
    except OSError as exc:
        raise ConfigError("metrics.port", f"cannot serve metrics on {host}:{port}: {exc}") from None
    return server


__all__ = ["WorkerMetrics", "otlp_metrics_wanted", "start_metrics"]
