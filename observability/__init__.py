"""Tracing and metrics for the pipeline (DESIGN: Observability).

This package imports nothing of OpenTelemetry at import time: `pipeline` asks
`tracing_enabled()` and imports `observability.tracing` (which needs the `[otlp]` extra)
only when the standard `OTEL_*` variables turn tracing on or the application has set a
`TracerProvider` of its own (then OpenTelemetry is loaded already).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping

from pipeline.runtime.errors import ConfigError

__all__ = ["producer_tracing", "require_tracing", "tracing_enabled"]


def tracing_enabled(environ: Mapping[str, str]) -> bool:
    """Whether to trace: the application set a TracerProvider, or the `OTEL_*` variables ask
    for traces (an exporter or an endpoint is set).

    `OTEL_SDK_DISABLED=true` turns it off whatever else is set, and `OTEL_TRACES_EXPORTER=none`
    unless the application set a provider.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if _app_tracer_provider_set():
        return True
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _app_tracer_provider_set() -> bool:
    """Whether the application set a global TracerProvider; never imports OpenTelemetry (if
    it is not loaded, nobody can have set one)."""
    if "opentelemetry.trace" not in sys.modules:
        return False
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def require_tracing() -> None:
    """Tracing is wanted: check OpenTelemetry is installed, else one `ConfigError` naming the
    extra (workers and producers alike say it this way)."""
    try:
        import observability.tracing  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "OTEL_*", f"tracing needs pip install 'claude-pipeline[otlp]' ({exc})"
        ) from None


def producer_tracing(environ: Mapping[str, str]) -> contextlib.AbstractContextManager[None]:
    """For a process that only submits: export the client's `send` spans when `OTEL_*` ask."""
    if not tracing_enabled(environ):
        return contextlib.nullcontext()
    require_tracing()
    from observability.tracing import producer_tracing as setup

    return setup(environ)
