"""The cost ledger on a real Redis: exact charges, counted once per task, read back by day."""

from __future__ import annotations

import datetime
import random

import pytest
from redis.asyncio import Redis

from pipeline import Keys, Services, Settings, load_settings
from pipeline.ledger import METRICS, Ledger, Totals, read_days
from pipeline.pricing import PriceTable, micro_usd
from pipeline.redis_conn import Availability
from pipeline.request import parse_request
from pipeline.task import Answer, Usage
from stages import store
from tests.stages.test_store import message

pytestmark = pytest.mark.anyio
AT = datetime.datetime(2026, 3, 1, 13, 7, 30, tzinfo=datetime.UTC)
DAY = AT.date()
USAGE = Usage(
    input_tokens=1201,
    output_tokens=333,
    cache_creation_input_tokens=700,
    cache_creation_1h_input_tokens=200,
    cache_read_input_tokens=4321,
)


@pytest.fixture
def client(aredis: Redis) -> Redis:
    return aredis


@pytest.fixture
def ledger(client: Redis, settings: Settings) -> Ledger:
    return Ledger(client, Keys(settings.prefix), settings, Availability(settings.redis.url))


def answer(settings: Settings, *, model: str = "claude-haiku-5-5", task_type: str = "classify",
           asked: str = "auto", usage: Usage = USAGE, **changes: object) -> Answer:  # fmt: skip
    fields = {"prompt": "Is this spam?", "type": task_type, "model": asked}
    values: dict[str, object] = {
        "request": parse_request(fields, settings),
        "model": model,
        "output": "spam",
        "stop_reason": "end_turn",
        "usage": usage,
        "attempts": 1,
    }
    values.update(changes)
    return Answer(**values)  # type: ignore[arg-type]


def price(settings: Settings, model: str, usage: Usage = USAGE) -> int:
    return PriceTable.from_settings(settings).cost_pico(model, usage, DAY)


async def read_one(client: Redis, settings: Settings, day: datetime.date = DAY) -> Totals:
    total = Totals()
    for row in (await read_days(client, Keys(settings.prefix), [day])).rows:
        total.add(row.totals)
    return total


async def test_a_paid_answer_is_charged_its_tokens_times_price(
    ledger: Ledger, client: Redis, settings: Settings
) -> None:
    charge = ledger.charge(answer(settings), AT)
    assert (charge.day, charge.minute, charge.model, charge.task_type) == (
        DAY, "@1307", "claude-haiku-5-5", "classify"
    )  # fmt: skip
    haiku = 1201 * 1_000_000 + 333 * 5_000_000 + 500 * 1_250_000 + 200 * 2_000_000 + 4321 * 100_000
    assert charge.spend_pico == haiku == price(settings, "claude-haiku-5-5")
    assert await ledger.record("t1", charge)
    rows = (await read_days(client, Keys(settings.prefix), [DAY])).rows
    assert [(r.model, r.type) for r in rows] == [("claude-haiku-5-5", "classify")]
    assert rows[0].totals == Totals(
        requests=1,
        input=1201,
        output=333,
        cache_write_5m=500,
        cache_write_1h=200,
        cache_read=4321,
        cost_pico=haiku,
        baseline_pico=price(settings, "claude-sonnet-5-5"),  # auto: the all-Sonnet baseline
    )


async def test_a_task_is_counted_once_however_often_it_is_recorded(
    ledger: Ledger, client: Redis, settings: Settings
) -> None:
    charge = ledger.charge(answer(settings), AT)
    assert await ledger.record("t1", charge)
    assert not await ledger.record("t1", charge)
    assert not await ledger.record("t1", ledger.charge(answer(settings), AT))
    assert await ledger.record("t2", charge)
    total = await read_one(client, settings)
    assert total.requests == 2
    assert total.cost_pico == 2 * charge.spend_pico
    keys = Keys(settings.prefix)
    marker_ttl = await client.ttl(keys.ledgered("t1"))
    assert 0 < marker_ttl <= settings.ledger.once_ttl_s
    day_ttl = await client.ttl(keys.ledger(DAY.isoformat()))
    assert settings.ledger.ttl_days * 86_400 - 60 < day_ttl <= settings.ledger.ttl_days * 86_400


async def test_cache_hits_are_counted_with_their_saving_and_cost_nothing(
    ledger: Ledger, client: Redis, settings: Settings
) -> None:
    hit = answer(settings, cached=True, attempts=0)
    coalesced = answer(settings, cached=True, coalesced=True, attempts=0)
    for task_id, one in (("h1", hit), ("h2", coalesced)):
        charge = ledger.charge(one, AT)
        assert charge.spend_pico == 0
        await ledger.record(task_id, charge)
    total = await read_one(client, settings)
    haiku = price(settings, "claude-haiku-5-5")
    assert total == Totals(hits=2, saved_pico=2 * haiku,
                           baseline_pico=2 * price(settings, "claude-sonnet-5-5"))  # fmt: skip
    assert total.routing_saved_pico == total.baseline_pico - 2 * haiku


async def test_an_explicit_model_is_its_own_baseline(ledger: Ledger, settings: Settings) -> None:
    opus = ledger.charge(answer(settings, model="claude-opus-5-5", asked="opus"), AT)
    assert opus.totals.baseline_pico == opus.spend_pico == price(settings, "claude-opus-5-5")
    by_id = answer(settings, model="claude-haiku-4-5", asked="claude-haiku-4-5")
    assert ledger.baseline_model(by_id.request) == "claude-haiku-4-5"


async def test_the_ledger_cost_equals_its_token_totals_times_price_exactly(
    ledger: Ledger, client: Redis, settings: Settings
) -> None:
    """Hundreds of odd-sized calls: no drift between the summed cost and tokens x price."""
    rng = random.Random(7)
    for i in range(300):
        usage = Usage(
            input_tokens=rng.randint(1, 5000),
            output_tokens=rng.randint(1, 900),
            cache_read_input_tokens=rng.randint(0, 3),  # sub-micro-dollar amounts
        )
        await ledger.record(f"t{i}", ledger.charge(answer(settings, usage=usage), AT))
    total = await read_one(client, settings)
    rates = PriceTable.from_settings(settings).on(DAY).rates("claude-haiku-5-5")
    assert rates is not None
    expected = total.input * rates.input + total.output * rates.output
    expected += total.cache_read * rates.cache_read
    assert total.cost_pico == expected
    assert total.requests == 300


async def test_days_and_minutes_are_kept_apart(
    ledger: Ledger, client: Redis, settings: Settings
) -> None:
    later = AT + datetime.timedelta(days=1, minutes=5)
    await ledger.record("a", ledger.charge(answer(settings), AT))
    await ledger.record("b", ledger.charge(answer(settings, task_type="reason",
                                                  model="claude-sonnet-5-5"), later))  # fmt: skip
    entries = await read_days(client, Keys(settings.prefix), [DAY, later.date()])
    assert [(r.day, r.type) for r in entries.rows] == [(DAY, "classify"), (later.date(), "reason")]
    assert [(m.at.isoformat(), m.tasks) for m in entries.minutes] == [
        ("2026-03-01T13:07:00+00:00", 1),
        ("2026-03-02T13:12:00+00:00", 1),
    ]
    assert entries.minutes[1].cost_pico == price(settings, "claude-sonnet-5-5")


async def test_new_task_types_fold_into_other_past_the_field_limit(
    client: Redis, fast_env: dict[str, str]
) -> None:
    settings = load_settings(env={**fast_env, "PIPELINE_LEDGER__MAX_FIELDS": "40"})
    ledger = Ledger(client, Keys(settings.prefix), settings, Availability(settings.redis.url))
    for i in range(30):
        await ledger.record(f"t{i}", ledger.charge(answer(settings, task_type=f"kind{i}"), AT))
    rows = (await read_days(client, Keys(settings.prefix), [DAY])).rows
    assert len(await client.hgetall(Keys(settings.prefix).ledger(DAY.isoformat()))) < 60
    assert "other" in {r.type for r in rows}
    assert sum(r.totals.requests for r in rows) == 30  # nothing is lost, only grouped


async def test_a_disabled_ledger_records_nothing(client: Redis, fast_env: dict[str, str]) -> None:
    settings = load_settings(env={**fast_env, "PIPELINE_LEDGER__ENABLED": "false"})
    ledger = Ledger(client, Keys(settings.prefix), settings, Availability(settings.redis.url))
    assert not await ledger.record("t1", ledger.charge(answer(settings), AT))
    assert await read_one(client, settings) == Totals()


async def test_the_store_handler_run_twice_on_one_entry_counts_it_once(
    client: Redis, settings: Settings
) -> None:
    """A store entry redelivered after a crash between the ledger write and the hand-off."""
    handler = await store.build(Services(settings, client, Keys(settings.prefix)))
    paid = answer(settings)
    msg = message({"prompt": "Is this spam?", "type": "classify"}, paid)
    first = await handler(msg)
    again = await handler(msg)
    today = datetime.datetime.now(datetime.UTC).date()
    total = await read_one(client, settings, today)
    assert total.requests == 1
    expected = PriceTable.from_settings(settings).cost_pico("claude-haiku-5-5", USAGE, today)
    assert total.cost_pico == expected
    for outcome in (first, again):  # the result reports the same (rounded) cost
        assert outcome.result is not None  # type: ignore[union-attr]
        cost = outcome.result["cost_usd"]  # type: ignore[union-attr]
        assert cost == f"{micro_usd(expected) / 1e6:.6f}"
    assert set(METRICS) >= {"requests", "hits", "cost_pico", "saved_pico", "baseline_pico"}
