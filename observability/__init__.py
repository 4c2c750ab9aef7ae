"""Tracing and metrics for the pipeline (DESIGN: Observability).

This package imports nothing of OpenTelemetry at import time: `pipeline` asks
`tracing_enabled()` and imports `observability.tracing` (which needs the `[otlp]` extra)
only when the standard `OTEL_*` variables turn tracing on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

__all__ = ["producer_tracing", "tracing_enabled"]


def tracing_enabled(environ: Mapping[str, str]) -> bool:
    """Whether the `OTEL_*` variables ask for traces: off unless an exporter or endpoint is set.

    `OTEL_SDK_DISABLED=true` and `OTEL_TRACES_EXPORTER=none` turn it off whatever else is set.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def producer_tracing(environ: Mapping[str, str]) -> contextlib.AbstractContextManager[None]:
    """For a process that only submits: export the client's `send` spans when `OTEL_*` ask."""
    if not tracing_enabled(environ):
        return contextlib.nullcontext()
    from observability.tracing import producer_tracing as setup

    return setup(environ)
