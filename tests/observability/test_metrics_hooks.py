"""The metrics hook and call observer, read back through the Prometheus exposition.

In-process: the hook is driven the way the runtime drives it (before_handle, then after_handle
in the same task), and the scrape text is parsed with prometheus_client's own parser, so the
names the dashboards query are checked too.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from observability.metric_names import METRICS, series
from observability.metrics import MetricsHook, PipelineMetrics, meter_provider
from pipeline.claude.task import Answer, Request, Usage
from pipeline.runtime.calls import CallReport
from pipeline.runtime.held import HeldReport
from pipeline.runtime.outcome import Complete, Fail, Forward, Outcome, Retry
from pipeline.runtime.results import make_result
from pipeline.runtime.stage import Message
from pipeline.runtime.wire import Envelope
from tests.conftest import StartFake

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.anyio


class Scrape:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reader = PrometheusMetricReader(registry=self.registry, scope_info_enabled=False)
        self.provider = meter_provider([reader], "test")
        self.metrics = PipelineMetrics(
            self.provider.get_meter("test"), looked_up=lambda req: getattr(req, "cache", False)
        )
        for collector in self.metrics.collectors():
            self.registry.register(collector)

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        text = generate_latest(self.registry).decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        wanted = set(labels.items())
        found = [v for (n, ls), v in self.samples().items() if n == name and wanted <= ls]
        assert found, f"no sample {name}{labels}"
        return sum(found)


@pytest.fixture
def scrape() -> Iterator[Scrape]:
    s = Scrape()
    yield s
    s.provider.shutdown()


def message(stage: str, task_type: str = "default", origin_ms: int | None = None) -> Message:
    now = int(time.time() * 1000)
    env = Envelope(1, "t1", {"prompt": "hi", "type": task_type}, 1, origin_ms or now, now)
    return Message(env, "1-0", stage, None, 1)


async def handle(hook: MetricsHook, msg: Message, outcome: Outcome, took_s: float = 0.0) -> None:
    """As the runtime does: both hooks in the handler's own task."""

    async def run() -> None:
        await hook.before_handle(msg)
        if took_s:
            await asyncio.sleep(took_s)
        await hook.after_handle(msg, outcome)

    await asyncio.create_task(run())


def answer(cached: bool) -> Answer:
    return Answer(request=Request(messages=[]), model="m", output="x", stop_reason="end_turn",
                  cached=cached)  # fmt: skip


async def test_outcomes_durations_cache_and_dead_letters_are_counted(scrape: Scrape) -> None:
    hook = scrape.metrics.hook()
    for _ in range(3):
        await handle(hook, message("cache-check"), Forward("store", answer(cached=True)))
    await handle(hook, message("cache-check"), Forward("router", Request(messages=[])))
    no_cache = Request(messages=[], cache=False)  # cache=false: not looked up, not a miss
    await handle(hook, message("cache-check"), Forward("router", no_cache))
    await handle(hook, message("router"), Forward("claude-call", None, lane="haiku"), 0.05)
    await handle(hook, message("router"), Retry("busy"))
    await handle(hook, message("router"), Fail("bad"))
    await hook.on_dead_letter("router", "t1", "bad")

    assert scrape.value("pipeline_cache_hits_total") == 3
    assert scrape.value("pipeline_cache_misses_total") == 1
    handled = "pipeline_stage_handled_total"
    assert scrape.value(handled, stage="cache-check", outcome="forward") == 5
    for outcome in ("forward", "retry", "fail", "dead_letter"):
        assert scrape.value(handled, stage="router", outcome=outcome) == 1
    assert scrape.value("pipeline_stage_duration_seconds_count", stage="router") == 3
    assert scrape.value("pipeline_stage_duration_seconds_sum", stage="router") >= 0.05
    # the 0.05 s handling falls in the 0.05 bucket, not below
    assert scrape.value("pipeline_stage_duration_seconds_bucket", stage="router", le="0.025") == 2


async def test_a_stored_result_records_latency_cost_and_tokens_unless_cached(
    scrape: Scrape,
) -> None:
    hook = scrape.metrics.hook()
    origin = int(time.time() * 1000) - 2500  # submitted 2.5 s ago
    paid = make_result("completed", model="claude-haiku-5-5", cost_usd="0.0125", input_tokens=100,
                       output_tokens=20, cache_read_input_tokens=30,
                       cache_creation_input_tokens=40)  # fmt: skip
    for _ in range(2):
        await handle(hook, message("store", "classify", origin), Complete(paid))
    cached = make_result("completed", model="claude-haiku-5-5", cost_usd="0", cached=True,
                         input_tokens=100, output_tokens=20)  # fmt: skip
    await handle(hook, message("store", "classify", origin), Complete(cached))

    assert scrape.value("pipeline_task_latency_seconds_count") == 3
    assert 7.5 <= scrape.value("pipeline_task_latency_seconds_sum") < 9.0
    assert scrape.value("pipeline_task_latency_seconds_bucket", le="2.5") == 0
    labels = {"model": "claude-haiku-5-5", "type": "classify"}
    assert scrape.value("pipeline_cost_usd_total", **labels) == pytest.approx(0.025)
    expected = {"input": 200, "output": 40, "cache_read": 60, "cache_write": 80}
    for token_type, count in expected.items():
        assert scrape.value("pipeline_tokens_total", token_type=token_type, **labels) == count
    assert scrape.value("pipeline_stage_handled_total", stage="store", outcome="complete") == 3


def report(status: int, usage: Usage | None, took_s: float, error: str | None = None) -> CallReport:
    start = time.time_ns()
    return CallReport(
        family="haiku", request_model="claude-haiku-5-5",
        response_model="claude-haiku-5-5" if usage else None, max_tokens=100, status=status,
        started_ns=start, ended_ns=start + int(took_s * 1e9), usage=usage, error_type=error,
    )  # fmt: skip


def test_call_reports_feed_the_genai_histograms_and_response_counts(scrape: Scrape) -> None:
    usage = Usage(input_tokens=10, output_tokens=50, cache_read_input_tokens=1000,
                  cache_creation_input_tokens=5)  # fmt: skip
    scrape.metrics.observe_call(report(200, usage, 1.5))
    scrape.metrics.observe_call(report(429, None, 0.01, "TransientError"))
    scrape.metrics.observe_call(report(529, None, 0.02, "TransientError"))
    scrape.metrics.observe_call(report(0, None, 10.0, "TransientError"))

    duration = "gen_ai_client_operation_duration_seconds"
    genai = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "anthropic",
             "gen_ai_request_model": "claude-haiku-5-5"}  # fmt: skip
    assert scrape.value(f"{duration}_count", **genai) == 4
    assert scrape.value(f"{duration}_count", error_type="TransientError") == 3
    assert scrape.value(f"{duration}_bucket", error_type="", le="1.28") == 0
    assert scrape.value(f"{duration}_bucket", error_type="", le="2.56") == 1
    tokens = "gen_ai_client_token_usage"
    assert scrape.value(f"{tokens}_sum", gen_ai_token_type="input") == 1015  # cache included
    assert scrape.value(f"{tokens}_sum", gen_ai_token_type="output") == 50
    assert scrape.value(f"{tokens}_count", gen_ai_token_type="input") == 1
    for status in ("200", "429", "529", "0"):
        assert scrape.value("pipeline_claude_responses_total", family="haiku", status=status) == 1


def held_report(outcome: str, waited_s: float) -> HeldReport:
    now = time.time_ns()
    return HeldReport(stage="claude-batch", lane="haiku", task_id="t1", outcome=outcome,
                      held_ns=now - int(waited_s * 1e9), released_ns=now)  # fmt: skip


def test_held_tasks_record_their_time_to_result_by_outcome(scrape: Scrape) -> None:
    hook = scrape.metrics.hook()
    hook.on_release(held_report("answered", 90.0))
    hook.on_release(held_report("answered", 4000.0))
    hook.on_release(held_report("to_standard", 20.0))
    held = "pipeline_held_duration_seconds"
    labels = {"stage": "claude-batch", "lane": "haiku"}
    assert scrape.value(f"{held}_count", outcome="answered", **labels) == 2
    assert scrape.value(f"{held}_count", outcome="to_standard", **labels) == 1
    assert scrape.value(f"{held}_bucket", outcome="answered", le="300.0") == 1
    assert scrape.value(f"{held}_bucket", outcome="answered", le="7200.0") == 2
    assert 4089 < scrape.value(f"{held}_sum", outcome="answered") < 4091


async def test_every_exposed_name_and_label_is_a_fixed_one(scrape: Scrape) -> None:
    """Only the names and labels in observability.metric_names (dashboards query them), and
    every per-process one of them once something happened."""
    hook = scrape.metrics.hook()
    await handle(hook, message("cache-check"), Forward("store", answer(cached=True)))
    await handle(hook, message("cache-check"), Forward("router", Request(messages=[])))
    paid = make_result("completed", model="m", cost_usd="0.5", input_tokens=1)
    await handle(hook, message("store"), Complete(paid))
    scrape.metrics.observe_call(report(200, Usage(input_tokens=1), 0.1))
    hook.on_release(held_report("answered", 60.0))
    fixed = series()
    seen: set[str] = set()
    for name, labels in scrape.samples():
        if name == "target_info":
            continue
        assert name in fixed, f"{name} is not a fixed metric name"
        assert {k for k, _ in labels} <= fixed[name], f"{name} has unexpected labels {labels}"
        seen.add(name)
    polled = {m.name for m in METRICS if m.kind == "gauge"}  # from the queue poll, not here
    assert {m.name for m in METRICS} - polled <= {
        n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in seen
    }


_APP_METER_PROVIDER = """
import asyncio, json, os, signal
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

from pipeline import load_settings
from pipeline.cli.worker import run_worker
from pipeline.client import Client
from stages import app as make_app


async def main() -> None:
    settings = load_settings()
    ready = asyncio.Event()
    stages = ["cache-check", "router", "claude-call", "store"]
    worker = asyncio.create_task(run_worker(make_app(settings), stages, settings, ready=ready))
    await asyncio.wait_for(ready.wait(), 30)
    async with Client.from_settings(settings) as client:
        task_id = await client.submit("Say hello", type="classify")
        result = await client.result(task_id, wait=30)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(worker, 30)
    data = reader.get_metrics_data()
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    print(json.dumps({"status": result and result["status"], "names": sorted(names)}))


asyncio.run(main())
"""


def test_a_meter_provider_the_application_set_receives_the_metrics(
    start_fake: StartFake, fast_env: dict[str, str]
) -> None:
    """No port, no `OTEL_*`: the application's own MeterProvider gets every instrument."""
    fake = start_fake()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env |= fast_env | {"PIPELINE_CLAUDE__BASE_URL": fake.base_url, "ANTHROPIC_API_KEY": "k"}
    out = subprocess.run([sys.executable, "-c", _APP_METER_PROVIDER], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["status"] == "completed"
    for name in ("pipeline.stage.handled", "pipeline.tokens", "pipeline.claude.responses",
                 "gen_ai.client.operation.duration", "gen_ai.client.token.usage",
                 "pipeline.stream.backlog"):  # fmt: skip
        assert name in found["names"], (name, found["names"])
