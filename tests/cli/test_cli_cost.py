"""`pipeline cost` against a real Redis: tables, JSON, date ranges, projections, bad input."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Callable
from functools import partial
from unittest import mock

import pytest
from redis.asyncio import Redis
from typer.testing import CliRunner

from pipeline import Keys, Settings
from pipeline.claude.ledger import Ledger
from pipeline.claude.request import parse_request
from pipeline.claude.task import Answer, Routed, Usage
from pipeline.claude.task_record import TaskRecords
from pipeline.cli.main import app
from pipeline.runtime.redis_conn import Availability

NOW = datetime.datetime.now(datetime.UTC)
D1, D2, D3 = (datetime.datetime(2026, 1, d, 12, tzinfo=datetime.UTC) for d in (10, 11, 12))
USAGE = Usage(input_tokens=1000, output_tokens=100)
# At list prices: Haiku 1000 x $1 + 100 x $5 per MTok = $0.0015; Sonnet $0.0045.
HAIKU, SONNET = 1_500_000_000, 4_500_000_000  # pico-dollars


Charge = tuple[str, datetime.datetime, str, str, bool]
Run = Callable[..., tuple[int, str]]


def record(settings: Settings, charges: list[Charge]) -> None:
    """(task id, when, model, type, cached) -> the ledger, as the stages write it: claude-call
    counts a paid call as it records its answer, the store counts the task."""

    async def write() -> None:
        redis = Redis.from_url(settings.redis.url)
        try:
            keys, available = Keys(settings.prefix), Availability(settings.redis.url)
            ledger = Ledger(redis, keys, settings, available)
            records = TaskRecords(redis, keys, available, ledger, 3600, 60_000)
            for task_id, at, model, task_type, cached in charges:
                request = parse_request({"prompt": "hi", "type": task_type}, settings)
                answer = Answer(request=request, model=model, output="ok", stop_reason="end_turn",
                                usage=USAGE, cached=cached)  # fmt: skip
                if not cached:  # under the claim claude-call takes, priced at `at`
                    await redis.hset(keys.task(task_id), mapping={"holder": "x", "fence": 1})
                    routed = Routed(request=request, family="haiku", model=model, max_tokens=64)
                    with mock.patch.object(ledger, "charge", partial(Ledger.charge, ledger, at=at)):
                        await records.record(task_id, routed, answer, fence=1)
                await ledger.record(task_id, ledger.charge(answer, at))
        finally:
            await redis.aclose()

    asyncio.run(write())


@pytest.fixture
def run(fast_env: dict[str, str]) -> Run:
    def invoke(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["cost", *args], env=fast_env)
        return result.exit_code, result.output

    return invoke


@pytest.fixture
def three_days(settings: Settings) -> None:
    record(
        settings,
        [
            ("a", D1, "claude-haiku-5-5", "classify", False),
            ("b", D1, "claude-haiku-5-5", "classify", True),  # a cache hit
            ("c", D1, "claude-sonnet-5-5", "reason", False),
            ("d", D2, "claude-haiku-5-5", "extract", False),
            ("e", D3, "claude-sonnet-5-5", "reason", False),
        ],
    )


def test_a_day_as_json_has_exact_totals_savings_and_groups(run: Run, three_days: None) -> None:
    code, out = run("--day", "2026-01-10", "--json")
    assert code == 0, out
    data = json.loads(out)
    total = data["total"]
    assert (total["requests"], total["hits"]) == (2, 1)
    assert (total["input"], total["output"]) == (2000, 200)
    assert total["cost_pico"] == HAIKU + SONNET
    assert total["cost_usd"] == 0.006  # a number (USD), exact in cost_pico
    assert total["saved_pico"] == HAIKU  # the hit, at its own model
    assert total["baseline_pico"] == 3 * SONNET  # everything at Sonnet, no cache
    assert total["routing_saved_pico"] == 3 * SONNET - SONNET - 2 * HAIKU
    assert set(data["by_model"]) == {"claude-haiku-5-5", "claude-sonnet-5-5"}
    assert data["by_type"]["classify"]["hits"] == 1
    assert data["by_type"]["reason"]["cost_usd"] == 0.0045


def test_a_range_sums_its_days_only(run: Run, three_days: None) -> None:
    code, out = run("--since", "2026-01-10", "--until", "2026-01-11", "--json", "--by", "type")
    assert code == 0, out
    data = json.loads(out)
    assert (data["first"], data["last"]) == ("2026-01-10", "2026-01-11")
    assert data["total"]["requests"] == 3
    assert set(data["by_type"]) == {"classify", "reason", "extract"}
    assert "by_model" not in data
    code, out = run("--day", "2026-01-12", "--json")
    assert json.loads(out)["total"]["cost_pico"] == SONNET


def test_the_table_shows_models_types_money_and_savings(run: Run, three_days: None) -> None:
    code, out = run("--since", "2026-01-10", "--until", "2026-01-12")
    assert code == 0, out
    for text in ("claude-haiku-5-5", "claude-sonnet-5-5", "classify", "extract", "reason",
                 "2026-01-10 .. 2026-01-12", "cache saved", "routing saved"):  # fmt: skip
        assert text in out, text
    assert "$0.012000" in out  # spent: 2 Haiku + 2 Sonnet calls
    assert "$0.001500" in out  # saved by the one cache hit
    assert "$0.022500" in out  # baseline: 5 tasks x Sonnet price


def test_the_tables_fit_80_columns_with_model_ids_and_types_whole(
    run: Run, settings: Settings
) -> None:
    """A dated model id (as the real API names its models) or a long task type is never split
    across lines: it has a line of its own when the numbers leave it too little room."""
    dated, long_type = "claude-sonnet-4-5-20250929", "support-ticket-triage-for-the-enterprise-tier"
    record(
        settings, [("a", D1, dated, long_type, False), ("b", D1, "claude-haiku-5-5", "x", False)]
    )
    code, out = run("--day", "2026-01-10")
    assert code == 0, out
    lines = out.splitlines()
    assert max(map(len, lines)) <= 80, out
    for name in (dated, long_type, "claude-haiku-5-5"):
        assert any(name in line for line in lines), (name, out)  # whole, on one line
    numbers = lines[lines.index(dated) + 1]  # its own line, then its numbers under it
    assert numbers.split() == ["1", "0", "1,000", "100", "0", "0", "$0.004500"], out
    assert any(line.startswith("claude-haiku-5-5 ") for line in lines), out  # beside its own


def test_projection_to_a_number_of_tasks_a_day(run: Run, three_days: None) -> None:
    code, out = run("--day", "2026-01-10", "--tasks-per-day", "1000000", "--json")
    assert code == 0, out
    per_day = json.loads(out)["per_day"]
    # 3 tasks cost $0.006 (1 hit): $0.002 a task; the baseline $0.0045 a task.
    assert per_day == {
        "tasks": 1_000_000, "cost_usd": 2000.0, "baseline_usd": 4500.0,
        "cost_pico": 2000 * 10**12, "baseline_pico": 4500 * 10**12,  # exact, for scripts
    }  # fmt: skip
    _, out = run("--day", "2026-01-10", "--tasks-per-day", "1000000")
    assert "$2,000.000000" in out and "$4,500.000000" in out


def test_current_rate_projection_uses_the_last_hour(run: Run, settings: Settings) -> None:
    record(
        settings,
        [
            ("now", NOW - datetime.timedelta(minutes=10), "claude-sonnet-5-5", "reason", False),
            ("old", NOW - datetime.timedelta(hours=3), "claude-sonnet-5-5", "reason", False),
        ],
    )
    code, out = run("--json")
    assert code == 0, out
    hour = json.loads(out)["last_hour"]
    assert (hour["tasks"], hour["cost_pico"]) == (1, SONNET)
    assert hour["per_day_usd"] == 0.108  # $0.0045 x 24
    assert "per day at the last hour's rate" in run()[1]


def test_an_empty_ledger_says_so(run: Run) -> None:
    code, out = run("--day", "2001-01-01")
    assert code == 0
    assert "nothing recorded" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--day", "2026-13-01"], "'2026-13-01' is not a day"),
        (["--since", "last week"], "'last week' is not a day"),
        (["--since", "2026-01-12", "--until", "2026-01-10"], "is after --until"),
        (["--day", "today", "--since", "2026-01-10"], "not both"),
        (["--until", "2026-01-10"], "--until needs --since"),
        (["--since", "2000-01-01", "--until", "2026-01-01"], "at most"),
        (["--by", "colour"], "use model or type"),
    ],
)
def test_bad_dates_and_options_are_clear_errors(run: Run, args: list[str], message: str) -> None:
    code, out = run(*args)
    assert code == 2
    assert message in " ".join(out.split()), out
