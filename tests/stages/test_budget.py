"""Budgets reserved before spend: worst-case reservations, settle, release, and the actions.

Real Redis, the fake Anthropic API. Costs here: sonnet $3/$15 per MTok, haiku $1/$5, so a
64-token answer to a short prompt reserves 981 micro-USD on sonnet and 327 on haiku.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from pipeline import ConfigError, Fail, Forward, Keys, Services, Settings, load_settings
from pipeline.claude.budget import Budget, Reservation
from pipeline.claude.settings import BudgetSettings
from pipeline.claude.task import Answer, Request, Routed, Usage
from pipeline.fake_claude import FakeClaudeServer
from pipeline.runtime.outcome import Defer
from pipeline.runtime.redis_conn import Availability
from pipeline.runtime.stage import Handler
from stages import claude_call
from tests.conftest import StartFake
from tests.stages.test_claude_call import KEY, message, stage_settings

pytestmark = pytest.mark.anyio
SONNET, HAIKU = "claude-sonnet-5-5", "claude-haiku-5-5"
SONNET_WORST, HAIKU_WORST = 981, 327  # micro-USD: 7 input tokens (estimate), 64 output
DAY = 86_400
NOON = datetime.datetime(2026, 12, 29, 12, tzinfo=datetime.UTC).timestamp()


def routed(n: int = 0, *, task_type: str = "default", family: str = "sonnet") -> Routed:
    request = Request(
        messages=[{"role": "user", "content": "What is 2+2?"}],
        type=task_type,
        metadata=f'{{"n": {n}}}',
    )  # fmt: skip (no request_hash: each call flies alone)
    model = SONNET if family == "sonnet" else HAIKU
    return Routed(request=request, family=family, model=model, max_tokens=64)


def with_budget(settings: Settings, **budget: Any) -> Settings:
    return msgspec.structs.replace(settings, budget=BudgetSettings(**budget))


def budget_for(settings: Settings, redis: Redis, clock: Any = None, **budget: Any) -> Budget:
    extra = {"clock": clock} if clock else {}
    available = Availability(settings.redis.url)
    return Budget(with_budget(settings, **budget), redis, Keys(settings.prefix), available, **extra)


@pytest.fixture
async def handler_for(
    aredis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Any]:
    """`await handler_for(fake, **budget)`: claude-call's handler with that budget."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    opened: list[Services] = []

    async def build(fake: FakeClaudeServer, **budget: Any) -> Handler:
        config = with_budget(stage_settings(settings, fake), **budget)
        services = Services(config, aredis, Keys(settings.prefix))
        opened.append(services)
        return await claude_call.build(services)

    yield build
    for services in opened:
        await services.aclose()


async def window_hash(aredis: Redis, settings: Settings, window: str) -> dict[str, int]:
    raw = await aredis.hgetall(Keys(settings.prefix).budget(window))
    return {k.decode(): int(v) for k, v in raw.items()}


# ---- reservations -----------------------------------------------------------------------


async def test_the_worst_case_is_the_estimated_input_and_all_of_max_tokens(
    aredis: Redis, settings: Settings
) -> None:
    budget = budget_for(settings, aredis, daily_usd=1.0)
    assert budget.worst_case_micro_usd(routed()) == SONNET_WORST
    assert budget.worst_case_micro_usd(routed(family="haiku")) == HAIKU_WORST


async def test_concurrent_reservations_never_overshoot(
    redis_url: str, aredis: Redis, settings: Settings
) -> None:
    """Eight 'workers' (own clients) race 400 reservations for room for exactly 50."""
    clients = [Redis.from_url(redis_url) for _ in range(8)]
    try:
        budgets = [
            budget_for(settings, c, clock=lambda: NOON, daily_usd=50 * SONNET_WORST / 1e6)
            for c in clients
        ]
        got = await asyncio.gather(*(budgets[i % 8].reserve(routed(i)) for i in range(400)))
    finally:
        for c in clients:
            await c.aclose()
    granted = [g for g in got if isinstance(g, Reservation)]
    assert len(granted) == 50
    assert all(isinstance(g, Defer) for g in got if g not in granted)
    totals = await window_hash(aredis, settings, "2026-12-29")
    assert totals["committed"] == 50 * SONNET_WORST and totals.get("spent", 0) == 0


async def test_settle_replaces_the_reservation_and_release_returns_it(
    aredis: Redis, settings: Settings
) -> None:
    budget = budget_for(settings, aredis, clock=lambda: NOON, daily_usd=2 * SONNET_WORST / 1e6)
    first, second = await budget.reserve(routed(1)), await budget.reserve(routed(2))
    assert isinstance(first, Reservation) and isinstance(second, Reservation)
    assert isinstance(await budget.reserve(routed(3)), Defer), "full"

    usage = Usage(input_tokens=7, output_tokens=20)  # 21 + 300 = 321 micro-USD
    answer = Answer(request=routed().request, model=SONNET, output="4", stop_reason="end_turn",
                    usage=usage)  # fmt: skip
    await budget.settle(first, answer)
    await budget.release(second)
    totals = await window_hash(aredis, settings, "2026-12-29")
    assert totals["committed"] == 321 and totals["spent"] == 321
    assert totals["committed:default"] == 321 and totals["spent:default"] == 321
    assert isinstance(await budget.reserve(routed(4)), Reservation), "room again after settling"
    ttl = await aredis.ttl(Keys(settings.prefix).budget("2026-12-29"))
    assert DAY < ttl <= 2 * DAY


async def test_no_budget_means_no_reservation_and_no_redis_round_trip(
    aredis: Redis, settings: Settings
) -> None:
    budget = budget_for(settings, aredis, types={"classify": 1.0})
    assert not budget.applies_to("summarise") and budget.applies_to("classify")
    free = await budget.reserve(routed(task_type="summarise"))
    assert free == Reservation(routed(task_type="summarise"))
    await budget.release(free)
    assert await aredis.keys(Keys(settings.prefix).budget("*")) == []


async def test_a_type_budget_limits_only_its_type(aredis: Redis, settings: Settings) -> None:
    budget = budget_for(
        settings, aredis, clock=lambda: NOON, action="fail", daily_usd=1.0,
        types={"classify": SONNET_WORST / 1e6},
    )  # fmt: skip
    assert isinstance(await budget.reserve(routed(1, task_type="classify")), Reservation)
    refused = await budget.reserve(routed(2, task_type="classify"))
    assert isinstance(refused, Fail)
    assert refused.reason.startswith("daily budget of type 'classify' $0.000981 reached")
    assert isinstance(await budget.reserve(routed(3, task_type="extract")), Reservation)


# ---- actions ------------------------------------------------------------------------------


async def test_fail_explains_the_budget_and_makes_no_call(
    start_fake: StartFake, handler_for: Any, aredis: Redis, settings: Settings
) -> None:
    fake = start_fake()
    handle = await handler_for(fake, daily_usd=0.0012, action="fail")
    assert isinstance(await handle(message(routed(1), task_id="a")), Forward)
    refused = await handle(message(routed(2), task_id="b"))
    assert isinstance(refused, Fail)
    assert refused.reason.startswith("daily budget $0.001200 reached (spent $0.000")
    assert "this call may cost up to $0.000981" in refused.reason
    assert refused.reason.endswith("the task fails (budget.action = fail)")
    assert fake.stats()["requests_total"] == 1
    # b took its claim (the claim comes before the budget) but recorded no answer.
    record = Keys(settings.prefix).task("b")
    assert await aredis.hmget(record, "answer", "req", "fence") == [None, None, b"1"]
    assert await aredis.hget(Keys(settings.prefix).task("a"), "answer") is not None


async def test_defer_waits_for_the_next_window_without_a_call(
    start_fake: StartFake, handler_for: Any, aredis: Redis, settings: Settings
) -> None:
    fake = start_fake()
    handle = await handler_for(fake, daily_usd=0.0001, action="defer")
    deferred = await handle(message(routed(1), task_id="later"))
    assert isinstance(deferred, Defer)
    assert "deferred until" in deferred.reason and deferred.reason.endswith("00:00:00 UTC")
    assert 0 < deferred.delay_ms <= (DAY + 60) * 1000
    assert fake.stats()["requests_total"] == 0


async def test_defer_delay_reaches_the_next_utc_day(aredis: Redis, settings: Settings) -> None:
    budget = budget_for(settings, aredis, clock=lambda: NOON, daily_usd=0.0001)
    deferred = await budget.reserve(routed())
    assert isinstance(deferred, Defer)
    assert "deferred until 2026-12-30 00:00:00 UTC" in deferred.reason
    assert DAY / 2 * 1000 <= deferred.delay_ms <= (DAY / 2 + 60) * 1000


async def test_downgrade_calls_the_cheaper_family_then_defers(
    start_fake: StartFake, handler_for: Any, aredis: Redis, settings: Settings
) -> None:
    fake = start_fake(max_output_tokens=40)  # complete answers: cacheable but for the downgrade
    # Sonnet never fits; one haiku call does (it costs >= 103 after settling), not two.
    room = 400 / 1e6
    handle = await handler_for(fake, daily_usd=room, action="downgrade", downgrade_to="haiku")
    task = routed(1)
    task = msgspec.structs.replace(
        task, request=msgspec.structs.replace(task.request, request_hash="hash-of-2+2")
    )
    first = await handle(message(task, task_id="cheap"))
    assert isinstance(first, Forward) and isinstance(first.body, Answer)
    assert first.body.model == HAIKU and first.body.stop_reason == "end_turn"
    assert not first.body.request.cache
    # A downgraded call flies alone and never fills the cache: its answer is not what the
    # request's hash (asked of Sonnet) stands for.
    assert await aredis.keys(f"{settings.prefix}:cache:*") == []
    assert await aredis.keys(f"{settings.prefix}:flight:*") == []
    assert list(fake.stats()["by_key_family"]) == [f"{KEY}|haiku"]
    second = await handle(message(routed(2), task_id="none-left"))
    assert isinstance(second, Defer) and "(on haiku too)" in second.reason
    assert fake.stats()["requests_total"] == 1


async def test_a_follower_gives_its_reservation_back(
    start_fake: StartFake, handler_for: Any, aredis: Redis, settings: Settings
) -> None:
    """The budget decides before coalescing, so a task that then follows an identical call in
    flight has reserved too: it hands the reservation back, and only the call is spent."""
    fake = start_fake(latency_ms=500)
    handle = await handler_for(fake, daily_usd=1.0)
    same = routed()
    same = msgspec.structs.replace(
        same, request=msgspec.structs.replace(same.request, request_hash="hash-of-2+2")
    )
    outcomes = await asyncio.gather(*(handle(message(same, task_id=f"same-{n}")) for n in range(3)))
    answers = [o.body for o in outcomes if isinstance(o, Forward)]
    assert len(answers) == 3 and sum(1 for a in answers if a.coalesced) == 2
    assert fake.stats()["requests_total"] == 1
    keys = await aredis.keys(Keys(settings.prefix).budget("*"))
    assert len(keys) == 1
    totals = {k.decode(): int(v) for k, v in (await aredis.hgetall(keys[0])).items()}
    assert totals["committed"] == totals["spent"] > 0  # the one call, settled


async def test_a_failed_call_gives_its_reservation_back(
    start_fake: StartFake, handler_for: Any, aredis: Redis, settings: Settings
) -> None:
    fake = start_fake(server_error_rate=1.0)
    handle = await handler_for(fake, daily_usd=1.0)
    with pytest.raises(Exception, match="500"):
        await handle(message(routed(), task_id="boom"))
    keys = await aredis.keys(Keys(settings.prefix).budget("*"))
    assert len(keys) == 1
    totals = {k.decode(): int(v) for k, v in (await aredis.hgetall(keys[0])).items()}
    assert totals["committed"] == 0 and totals.get("spent", 0) == 0


# ---- config -------------------------------------------------------------------------------


def test_budget_settings_are_validated_with_the_fields_name() -> None:
    with pytest.raises(ConfigError, match=r"budget\.downgrade_to"):
        load_settings(env={"PIPELINE_BUDGET__DOWNGRADE_TO": "tiny",
                           "PIPELINE_BUDGET__ACTION": "downgrade"})  # fmt: skip
    assert load_settings(env={"PIPELINE_BUDGET__DOWNGRADE_TO": "tiny"})  # not used by "defer"
    with pytest.raises(ConfigError, match=r"budget\.action"):
        load_settings(env={"PIPELINE_BUDGET__ACTION": "panic"})
    with pytest.raises(ConfigError, match=r"budget\.daily_usd"):
        load_settings(env={"PIPELINE_BUDGET__DAILY_USD": "-1"})
    settings = load_settings(env={"PIPELINE_BUDGET__DAILY_USD": "50", "PIPELINE_BUDGET__ACTION":
                                  "fail"})  # fmt: skip
    assert settings.budget.daily_usd == 50.0 and settings.budget.action == "fail"
