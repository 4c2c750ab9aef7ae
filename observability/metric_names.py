"""The Prometheus names of the pipeline's metrics, fixed: dashboards, alerts and KEDA query them.

Counters are listed with their `_total` suffix and histograms by their base name (queries add
`_bucket`, `_sum`, `_count`), as PromQL writes them. `observability/metrics.py` creates the
OpenTelemetry instruments whose Prometheus exposition comes out as exactly these names (a test
scrapes a worker and checks).
"""

from __future__ import annotations

#: From the periodic queue poll (the same values from every worker: use `max by (stage, lane)`).
GAUGES = (
    "pipeline_stream_backlog",  # {stage, lane}: entries in the stream (acked ones are deleted)
    "pipeline_stream_pending",  # {stage, lane}: delivered, not yet handed on
    "pipeline_stream_lag",  # {stage, lane}: not yet delivered to the group (Redis >= 7)
    "pipeline_stream_oldest_pending_age_seconds",  # {stage, lane}
    "pipeline_delayed_retries",  # {stage, lane}: waiting in the delayed-retry set
    "pipeline_dlq_size",
)

#: Per worker process (sum them: `sum by (...) (rate(...[5m]))`).
COUNTERS = (
    "pipeline_stage_handled_total",  # {stage, outcome}
    "pipeline_cache_hits_total",
    "pipeline_cache_misses_total",
    "pipeline_cost_usd_total",  # {model, type}
    "pipeline_tokens_total",  # {model, type, token_type}
    "pipeline_claude_responses_total",  # {family, status}
)

HISTOGRAMS = (
    "pipeline_stage_duration_seconds",  # {stage}: handling time
    "pipeline_task_latency_seconds",  # ingress to stored result
    "gen_ai_client_operation_duration_seconds",  # {gen_ai_request_model, error_type, …}
    "gen_ai_client_token_usage",  # {gen_ai_token_type, gen_ai_request_model, …}
)

#: `outcome` label values of pipeline_stage_handled_total.
OUTCOMES = ("forward", "complete", "retry", "fail", "dead_letter")
#: `token_type` label values of pipeline_tokens_total.
TOKEN_TYPES = ("input", "output", "cache_read", "cache_write")

ALL = GAUGES + COUNTERS + HISTOGRAMS


def series_names() -> frozenset[str]:
    """Every sample name a scrape can show (histograms expanded into their three series)."""
    expanded = [f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")]
    return frozenset((*GAUGES, *COUNTERS, *expanded))
