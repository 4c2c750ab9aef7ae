"""OpenTelemetry set up the standard way, in one place: the application's own providers when
it has set them, else the SDK's providers and exporters built from the `OTEL_*` variables.

Imported only when tracing or metrics are on (it needs the `[otlp]` extra). The variables
mean what they mean to the SDK; this module reads only the few the SDK leaves to whoever
assembles it: which exporters (`OTEL_TRACES_EXPORTER`, `OTEL_METRICS_EXPORTER`) and, for
OTLP, which protocol (`OTEL_EXPORTER_OTLP_<SIGNAL>_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`,
else gRPC as in the Python SDK). Each exporter then reads its own endpoint, headers, timeout,
compression and certificates; the batch processor its `OTEL_BSP_*`; the sampler
`OTEL_TRACES_SAMPLER`; the resource `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider

from observability.propagation import SCOPE
from pipeline.runtime.errors import ConfigError

__all__ = [
    "SCOPE",
    "app_meter_provider",
    "app_tracer_provider",
    "close",
    "exporter_names",
    "otlp_protocol",
    "resource",
    "tracer_provider_from_env",
    "version",
]

_PROTOCOLS = ("grpc", "http/protobuf")
_OTLP_TRACES = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}
Signal = Literal["traces", "metrics"]
log = logging.getLogger(__name__)


def version() -> str:
    try:
        return importlib.metadata.version("claude-pipeline")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def app_tracer_provider() -> trace.TracerProvider | None:
    """The provider the application set globally (in its code or under
    `opentelemetry-instrument`), or None when it set none."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, ProxyTracerProvider | NoOpTracerProvider):
        return None
    return provider


def app_meter_provider() -> MeterProvider | None:
    """The SDK meter provider the application set globally, or None (the API's stand-in,
    before anyone sets one, has no public type: an SDK provider is what we can feed)."""
    provider = metrics.get_meter_provider()
    return provider if isinstance(provider, MeterProvider) else None


def otlp_protocol(environ: Mapping[str, str], signal: Signal) -> str:
    """The OTLP protocol for `signal`: the signal's variable, else the generic one, else gRPC.

    Raises:
        ConfigError: a protocol the exporters do not speak (never a silent fallback).
    """
    variable = f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL"
    if not environ.get(variable):
        variable = "OTEL_EXPORTER_OTLP_PROTOCOL"
    protocol = (environ.get(variable) or "grpc").strip().lower()
    if protocol not in _PROTOCOLS:
        raise ConfigError(variable, f"{protocol!r} is not one of {', '.join(_PROTOCOLS)}")
    return protocol


def exporter_names(environ: Mapping[str, str], signal: Signal, default: str) -> list[str]:
    """`OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER` as a list; `none` means none."""
    raw = environ.get(f"OTEL_{signal.upper()}_EXPORTER", default)
    names = [n.strip().lower() for n in raw.split(",")]
    return [n for n in names if n not in ("", "none")]


def resource(service_name: str) -> Resource:
    """The SDK's resource from the variables; `service_name` when they name no service."""
    found = Resource.create()
    if str(found.attributes.get("service.name", "")).startswith("unknown_service"):
        found = found.merge(Resource({"service.name": service_name}))
    return _HashedOnce(found.attributes, found.schema_url)


class _HashedOnce(Resource):
    """A resource that hashes itself once. The OTLP encoder groups every span of a batch by
    its resource, and `Resource.__hash__` JSON-encodes all the attributes each time: ~12% of
    the export thread's CPU at 100% sampling. A resource is immutable, so the hash is too."""

    _hash: int | None = None

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = super().__hash__()
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or super().__eq__(other)


def tracer_provider_from_env(environ: Mapping[str, str], service_name: str) -> TracerProvider:
    """The SDK provider the variables describe (sampler, resource, batch processors with
    their exporters), made the global one so that handlers' own spans use it too."""
    provider = TracerProvider(resource=resource(service_name))
    for exporter in _span_exporters(environ):
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def otlp_metric_exporter(environ: Mapping[str, str]) -> Any:
    """The SDK's OTLP metric exporter for the protocol the variables name."""
    if otlp_protocol(environ, "metrics") == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
        OTLPMetricExporter as GrpcExporter,
    )

    return GrpcExporter()


def close(shutdown: Callable[[], object], what: str, timeout_s: float = 5.0) -> None:
    """Flush and shut a provider down, waiting at most `timeout_s`: with the collector down,
    the exporters' retries would hold a stopping process for half a minute. What is not
    sent by then is dropped."""
    closing = threading.Thread(target=shutdown, daemon=True)
    closing.start()
    closing.join(timeout_s)
    if closing.is_alive():
        log.warning("%s not exported within %.0fs of stopping dropped", what, timeout_s)


def close_tracer_provider(provider: trace.TracerProvider, owned: bool) -> None:
    """Ours: shut down (flushes). The application's: flush only, it shuts it down itself."""
    if not isinstance(provider, TracerProvider):
        return
    if owned:
        close(provider.shutdown, "tracing: spans")
    else:
        close(provider.force_flush, "tracing: spans")


def close_meter_provider(provider: MeterProvider) -> None:
    close(provider.shutdown, "metrics: points")


def _span_exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in exporter_names(environ, "traces", "otlp"):
        if name == "otlp":
            name = _OTLP_TRACES[otlp_protocol(environ, "traces")]
        found = importlib.metadata.entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found:
            raise ConfigError(
                "OTEL_TRACES_EXPORTER",
                f"no trace exporter {name!r} is installed (pip install 'claude-pipeline[otlp]')",
            )
        exporters.append(next(iter(found)).load()())
    return exporters
