"""Worker metrics: OpenTelemetry instruments, a Prometheus scrape endpoint and/or OTLP export.

Two sources feed them: the runtime's one observation seam, `MetricsHook` (outcomes, handling
time, end-to-end latency, cache hits, cost and tokens, each model call's report: GenAI call
duration and token usage, responses by status; and how long held tasks waited), and a
periodic queue poll
(`observability.queues`). The names as
Prometheus shows them are fixed in `observability.metric_names`.

Hot path: the OTel SDK spends ~6-15 µs on every synchronous `add`/`record` (measured), against
~25 µs of CPU a trivial stage spends per entry. Counters are therefore plain dict increments
(~0.1 µs) that observable counters read at collection time, and the per-entry histograms
(handling time, end-to-end latency) are `observability.buckets` served straight to Prometheus.
Only the per-call GenAI histograms (a call costs milliseconds of CPU) go through the SDK.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader

from observability.buckets import Buckets, BucketsCollector
from observability.otel import resource
from pipeline.runtime.calls import CallReport
from pipeline.runtime.held import HeldReport
from pipeline.runtime.hooks import Hook
from pipeline.runtime.outcome import Complete, Fail, Forward, Outcome, Retry
from pipeline.runtime.stage import Message

log = logging.getLogger(__name__)

#: Handling time: sub-millisecond for most stages, up to minutes for a Claude call.
STAGE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)  # fmt: skip
#: Ingress to stored result: a cached answer in milliseconds, a backlog in hours.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
                     60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)  # fmt: skip
#: The GenAI semantic conventions' advised buckets.
CALL_BUCKETS_S = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                  40.96, 81.92)  # fmt: skip
#: A task held outside the streams (waiting for a batch): minutes to a day.
HELD_BUCKETS_S = (1.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0,
                  28800.0, 43200.0, 86400.0, 172800.0)  # fmt: skip
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)  # fmt: skip

_OUTCOMES: dict[type, str] = {
    Forward: "forward",
    Complete: "complete",
    Retry: "retry",
    Fail: "fail",
}
_Key = TypeVar("_Key", bound=tuple[str, ...])
_started: ContextVar[float] = ContextVar("pipeline_metrics_started", default=0.0)


@dataclass
class Tallies:
    """Cumulative counts of this process, incremented on the event loop.

    Collection (in the exporter's thread) copies each dict with `list(d.items())`, which
    CPython does without releasing the GIL, so no lock is needed on the hot path.
    """

    handled: defaultdict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    cache: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    cost_usd: defaultdict[tuple[str, str], float] = field(
        default_factory=lambda: defaultdict(float)
    )
    tokens: defaultdict[tuple[str, str, str], int] = field(default_factory=lambda: defaultdict(int))
    responses: defaultdict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))


class PipelineMetrics:
    """The instruments on one or more Meters (the application's provider and/or ours), and
    what the hook records."""

    def __init__(
        self,
        meters: Meter | Sequence[Meter],
        *,
        looked_up: Callable[[object], bool] = lambda request: True,
    ) -> None:
        """`looked_up(request)`: whether cache-check looked this request up in the cache (the
        application's rule; the composition root passes it in)."""
        meters = [meters] if isinstance(meters, Meter) else list(meters)
        self.tallies = tallies = Tallies()
        self._looked_up = looked_up
        # The two per-entry histograms skip the SDK (see observability.buckets): they are
        # served to Prometheus by `collectors()`, and not sent by OTLP.
        self.stage_duration = Buckets(STAGE_BUCKETS_S)
        self.task_latency = Buckets(LATENCY_BUCKETS_S)
        self.call_duration = [m.create_histogram(
            "gen_ai.client.operation.duration", "s", "GenAI operation duration",
            explicit_bucket_boundaries_advisory=CALL_BUCKETS_S,
        ) for m in meters]  # fmt: skip
        self.token_usage = [m.create_histogram(
            "gen_ai.client.token.usage", "{token}", "Number of input and output tokens used",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        ) for m in meters]  # fmt: skip
        self.held_duration = [m.create_histogram(
            "pipeline.held.duration", "s", "Time a stage held a task outside its streams, "
            "until it was handed on (the batch lane: shelved to answered)",
            explicit_bucket_boundaries_advisory=HELD_BUCKETS_S,
        ) for m in meters]  # fmt: skip
        counters: Sequence[tuple[str, str, str, Callable[[], Iterable[Observation]]]] = (
            ("pipeline.stage.handled", "{entry}", "Entries handled, by outcome (dead_letter: "
             "entries sent to the DLQ for any reason)",
             lambda: _observe(tallies.handled, ("stage", "outcome"))),
            ("pipeline.cache.hits", "{task}", "Tasks answered from the response cache",
             lambda: [Observation(tallies.cache["hits"])]),
            ("pipeline.cache.misses", "{task}", "Cacheable tasks not found in the cache",
             lambda: [Observation(tallies.cache["misses"])]),
            ("pipeline.cost_usd", "{USD}", "Cost of stored results in US dollars",
             lambda: _observe(tallies.cost_usd, ("model", "type"))),
            ("pipeline.tokens", "{token}", "Tokens paid for, by model, task type and kind",
             lambda: _observe(tallies.tokens, ("model", "type", "token_type"))),
            ("pipeline.claude.responses", "{response}", "Claude calls by HTTP status "
             "(0: timeout or connection error)",
             lambda: _observe(tallies.responses, ("family", "status"))),
        )  # fmt: skip
        for meter in meters:
            for name, unit, description, read in counters:
                meter.create_observable_counter(name, [_callback(read)], unit, description)

    def hook(self) -> MetricsHook:
        return MetricsHook(self)

    def collectors(self) -> list[BucketsCollector]:
        """The per-entry histograms, for the Prometheus registry the OTel reader serves."""
        return [
            BucketsCollector("pipeline_stage_duration_seconds",
                             "Time a stage's handler took per entry", ["stage"],
                             self.stage_duration),
            BucketsCollector("pipeline_task_latency_seconds",
                             "Ingress to stored result, per completed task", [],
                             self.task_latency),
        ]  # fmt: skip

    # ---- what the hook records -------------------------------------------------------------

    def handled(self, msg: Message, outcome: Outcome, elapsed_s: float | None) -> None:
        stage = msg.stage
        if elapsed_s is not None:
            self.stage_duration.observe((stage,), elapsed_s)
        kind = _OUTCOMES.get(type(outcome)) or type(outcome).__name__.lower()
        self.tallies.handled[stage, kind] += 1
        if stage == "cache-check" and isinstance(outcome, Forward):
            self._cache_lookup(outcome)
        elif isinstance(outcome, Complete) and outcome.result is not None:
            self._stored(msg, outcome.result)

    def _cache_lookup(self, outcome: Forward) -> None:
        """A hit goes straight to store with a cached Answer; a miss goes on to the router."""
        if outcome.to == "store" and getattr(outcome.body, "cached", False):
            self.tallies.cache["hits"] += 1
        elif outcome.to == "router" and self._looked_up(outcome.body):
            self.tallies.cache["misses"] += 1

    def _stored(self, msg: Message, result: Mapping[str, str]) -> None:
        """A result stored: end-to-end latency; cost and tokens unless it cost nothing."""
        origin_ms = msg.envelope.origin_ms
        if origin_ms:
            self.task_latency.observe((), max(0.0, time.time() - origin_ms / 1000))
        if result.get("cached") == "true":
            return  # a cache hit or a coalesced follower: the first call paid for it
        model, task_type = result.get("model") or "unknown", msg.fields.get("type", "default")
        t = self.tallies
        t.cost_usd[model, task_type] += _number(result.get("cost_usd"))
        for token_type, name in (
            ("input", "input_tokens"),
            ("output", "output_tokens"),
            ("cache_read", "cache_read_input_tokens"),
            ("cache_write", "cache_creation_input_tokens"),
        ):
            t.tokens[model, task_type, token_type] += int(_number(result.get(name)))

    # ---- what model calls report ----------------------------------------------------------

    def observe_call(self, report: CallReport) -> None:
        """GenAI semantic conventions: operation duration and token usage per call."""
        attrs = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "anthropic",
            "gen_ai.request.model": report.request_model,
        }
        if report.error_type:
            attrs["error.type"] = report.error_type
        took_s = max(0, report.ended_ns - report.started_ns) / 1e9
        for histogram in self.call_duration:
            histogram.record(took_s, attrs)
        self.tallies.responses[report.family, str(report.status)] += 1
        usage = report.usage
        if usage is None:
            return
        model = {"gen_ai.request.model": report.request_model}
        prompt = (
            usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
        )  # every input token the model read, as the GenAI conventions count them
        for histogram in self.token_usage:
            histogram.record(prompt, {**model, "gen_ai.token.type": "input"})
            histogram.record(usage.output_tokens, {**model, "gen_ai.token.type": "output"})

    def observe_release(self, report: HeldReport) -> None:
        """How long a held task waited, by where it went (answered, to the standard lane)."""
        attrs = {"stage": report.stage, "lane": report.lane or "", "outcome": report.outcome}
        waited_s = max(0, report.released_ns - report.held_ns) / 1e9
        for histogram in self.held_duration:
            histogram.record(waited_s, attrs)


class MetricsHook(Hook):
    """Times each handling and counts its outcome; dead letters come from their own hook,
    model calls from `on_call`."""

    def __init__(self, metrics: PipelineMetrics) -> None:
        self._metrics = metrics

    async def before_handle(self, msg: Message) -> None:
        # The handler's own task runs both hooks, so the context variable is per entry.
        _started.set(time.perf_counter())

    async def after_handle(self, msg: Message, outcome: Outcome | BaseException) -> None:
        if isinstance(outcome, BaseException):
            return
        started = _started.get()
        elapsed = time.perf_counter() - started if started else None
        self._metrics.handled(msg, outcome, elapsed)

    async def on_dead_letter(self, stage: str, task_id: str, reason: str) -> None:
        self._metrics.tallies.handled[stage, "dead_letter"] += 1

    def on_call(self, report: CallReport) -> None:
        self._metrics.observe_call(report)

    def on_release(self, report: HeldReport) -> None:
        self._metrics.observe_release(report)


def _observe(counts: Mapping[_Key, float], names: tuple[str, ...]) -> list[Observation]:
    return [Observation(v, dict(zip(names, k, strict=True))) for k, v in list(counts.items())]


def _callback(
    read: Callable[[], Iterable[Observation]],
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    return lambda _: read()


def _number(text: str | None) -> float:
    try:
        return float(text) if text else 0.0
    except ValueError:
        return 0.0


def meter_provider(readers: Sequence[MetricReader], service_name: str) -> MeterProvider:
    """A provider of our own (not the global one); no exemplars, which cost on every record.

    The resource comes from `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`, else names
    `service_name`.
    """
    return MeterProvider(
        metric_readers=readers,
        resource=resource(service_name),
        exemplar_filter=AlwaysOffExemplarFilter(),
        shutdown_on_exit=False,
    )


__all__ = ["MetricsHook", "PipelineMetrics", "Tallies", "meter_provider"]
