"""The Prometheus names the workers export, in one place.

The Grafana dashboard, the docs and the tests refer to these names, so a rename shows up as a
failing test (tests/test_deploy_files.py) rather than as an empty panel. Names are as Prometheus
sees them (OTel's exporter adds `_total` to counters and the unit to histograms).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

Kind = Literal["gauge", "counter", "histogram"]


class Metric(NamedTuple):
    name: str
    kind: Kind
    labels: tuple[str, ...]


#: Queue gauges come from a periodic poll that every worker runs, so each worker exports the
#: same value: query them with `max by (stage, lane)`, and counters with `sum(rate(...))`.
METRICS: tuple[Metric, ...] = (
    Metric("pipeline_stream_backlog", "gauge", ("stage", "lane")),
    Metric("pipeline_stream_pending", "gauge", ("stage", "lane")),
    Metric("pipeline_stream_lag", "gauge", ("stage", "lane")),
    Metric("pipeline_stream_oldest_pending_age_seconds", "gauge", ("stage", "lane")),
    Metric("pipeline_delayed_retries", "gauge", ("stage", "lane")),
    Metric("pipeline_dlq_size", "gauge", ()),
    Metric("pipeline_held_tasks", "gauge", ("stage", "lane", "state")),
    Metric("pipeline_held_oldest_age_seconds", "gauge", ("stage", "lane")),
    Metric("pipeline_held_duration_seconds", "histogram", ("stage", "lane", "outcome")),
    Metric("pipeline_stage_handled_total", "counter", ("stage", "outcome")),
    Metric("pipeline_stage_duration_seconds", "histogram", ("stage",)),
    Metric("pipeline_task_latency_seconds", "histogram", ()),
    Metric("pipeline_cache_hits_total", "counter", ()),
    Metric("pipeline_cache_misses_total", "counter", ()),
    Metric("pipeline_cost_usd_total", "counter", ("model", "type")),
    Metric("pipeline_tokens_total", "counter", ("model", "type", "token_type")),
    Metric("pipeline_claude_responses_total", "counter", ("family", "status")),
    Metric(
        "gen_ai_client_operation_duration_seconds",
        "histogram",
        ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "error_type"),
    ),
    Metric("gen_ai_client_token_usage", "histogram", ("gen_ai_token_type", "gen_ai_request_model")),
)

#: Labels that Prometheus adds to every scraped series (see observability/prometheus).
TARGET_LABELS = ("job", "instance", "service")


def series() -> dict[str, frozenset[str]]:
    """Every series name a query may use, with the labels it carries.

    A histogram `h` is queried as `h_bucket` (with `le`), `h_sum` and `h_count`.
    """
    out: dict[str, frozenset[str]] = {}
    for metric in METRICS:
        labels = frozenset(metric.labels + TARGET_LABELS)
        if metric.kind == "histogram":
            out[f"{metric.name}_bucket"] = labels | {"le"}
            out[f"{metric.name}_sum"] = labels
            out[f"{metric.name}_count"] = labels
        else:
            out[metric.name] = labels
    return out
