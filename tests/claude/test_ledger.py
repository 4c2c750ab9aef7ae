"""The cost ledger on a real Redis: exact charges, read back by day, each counted once: a
paid call as claude-call records its answer (`TaskRecords.record`), a task by the store
(`Ledger.record`, marked in the task's record)."""

from __future__ import annotations

import datetime
import random

import msgspec
import pytest
from redis.asyncio import Redis

from pipeline import Keys, Services, Settings, load_settings
from pipeline.claude.ledger import CALL_METRICS, METRICS, TASK_METRICS, Ledger, Totals, read_days
from pipeline.claude.pricing import PriceTable, micro_usd
from pipeline.claude.request import parse_request
from pipeline.claude.task import Answer, Routed, Usage
from pipeline.claude.task_record import ClaimState, TaskRecords
from pipeline.runtime.redis_conn import Availability
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


def price(settings: Settings, model: str, usage: Usage = USAGE, day: datetime.date = DAY) -> int:
    return PriceTable.from_settings(settings).cost_pico(model, usage, day)


async def read_one(client: Redis, settings: Settings, day: datetime.date = DAY) -> Totals:
    total = Totals()
    for row in (await read_days(client, Keys(settings.prefix), [day])).rows:
        total.add(row.totals)
    return total


def today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


def records_for(client: Redis, settings: Settings, ledger: Ledger) -> TaskRecords:
    """The task records claude-call counts its paid calls with."""
    return TaskRecords(
        client, Keys(settings.prefix), Availability(settings.redis.url), ledger,
        settings.results.live_ttl_s, settings.runtime_for("claude-call").lease_ms,
    )  # fmt: skip


async def pay(client: Redis, records: TaskRecords, task_id: str, paid: Answer) -> None:
    """Record `paid` as claude-call does after its call (under the claim it took before):
    the call is counted now (today)."""
    routed = Routed(request=paid.request, family="haiku", model=paid.model, max_tokens=64)
    await client.hset(records.keys.task(task_id), mapping={"holder": "x", "fence": 1})
    claim = await records.record(task_id, routed, paid, fence=1)
    assert claim.answer == paid


async def test_a_paid_answer_is_charged_its_tokens_times_price(
    ledger: Ledger, client: Redis, settings: Settings
) -> None:
    charge = ledger.charge(answer(settings), AT)
    assert (charge.day, charge.minute, charge.model, charge.task_type) == (
        DAY, "@1307", "claude-haiku-5-5", "classify"
    )  # fmt: skip
    haiku = 1201 * 1_000_000 + 333 * 5_000_000 + 500 * 1_250_000 + 200 * 2_000_000 + 4321 * 100_000
    assert charge.spend_pico == haiku == price(settings, "claude-haiku-5-5")
    sonnet = price(settings, "claude-sonnet-5-5")  # auto: the all-Sonnet baseline
    assert charge.totals == Totals(
        requests=1,
        input=1201,
        output=333,
        cache_write_5m=500,
        cache_write_1h=200,
        cache_read=4321,
        cost_pico=haiku,
        baseline_pico=sonnet,
    )
    # The two parts split the charge: nothing in both, nothing in neither.
    assert set(CALL_METRICS) | set(TASK_METRICS) == set(METRICS)
    assert not set(CALL_METRICS) & set(TASK_METRICS)
    call = msgspec.structs.replace(charge.totals, baseline_pico=0)
    assert charge.part(CALL_METRICS).totals == call
    assert charge.part(TASK_METRICS).totals == Totals(baseline_pico=sonnet)

    # The store counts the task: its baseline, in its minute, and no spend (the call's).
    assert await ledger.record("t1", charge)
    entries = await read_days(client, Keys(settings.prefix), [DAY])
    assert [(r.model, r.type, r.totals) for r in entries.rows] == [
        ("claude-haiku-5-5", "classify", Totals(baseline_pico=sonnet))
    ]
    assert [(m.at.minute, m.tasks, m.cost_pico) for m in entries.minutes] == [(7, 1, 0)]

    # The paid call is counted as claude-call records its answer: every token, at its price.
    await pay(client, records_for(client, settings, ledger), "t1", answer(settings))
    day = today()
    entries = await read_days(client, Keys(settings.prefix), [day])
    assert [(r.model, r.type) for r in entries.rows] == [("claude-haiku-5-5", "classify")]
    call.cost_pico = price(settings, "claude-haiku-5-5", day=day)
    assert entries.rows[0].totals == call
    assert [(m.tasks, m.cost_pico) for m in entries.minutes] == [(0, call.cost_pico)]


async def test_a_task_is_counted_once_however_often_it_is_recorded(
    ledger: Ledger, client: Redis, settings: Settings
) -> None:
    charge = ledger.charge(answer(settings), AT)
    assert await ledger.record("t1", charge)
    assert not await ledger.record("t1", charge)
    assert not await ledger.record("t1", ledger.charge(answer(settings), AT))
    assert await ledger.record("t2", charge)
    entries = await read_days(client, Keys(settings.prefix), [DAY])
    total = await read_one(client, settings)
    assert total == Totals(baseline_pico=2 * charge.totals.baseline_pico)
    assert [m.tasks for m in entries.minutes] == [2]
    # The mark is the `counted` field of the task's record, which lives as long as a live
    # task's record (until the store's hand-off gives it its result's TTL).
    keys = Keys(settings.prefix)
    assert await client.hgetall(keys.task("t1")) == {b"counted": b"1"}
    marker_ttl = await client.ttl(keys.task("t1"))
    assert settings.results.live_ttl_s - 60 < marker_ttl <= settings.results.live_ttl_s
    # A record that exists already (claude-call's) keeps its TTL and other fields.
    await client.hset(keys.task("t3"), "answer", b"packed")
    await client.expire(keys.task("t3"), 120)
    assert await ledger.record("t3", charge)
    assert not await ledger.record("t3", charge)
    assert await client.hgetall(keys.task("t3")) == {b"answer": b"packed", b"counted": b"1"}
    assert 0 < await client.ttl(keys.task("t3")) <= 120
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
    records = records_for(client, settings, ledger)
    day = today()
    for i in range(300):
        usage = Usage(
            input_tokens=rng.randint(1, 5000),
            output_tokens=rng.randint(1, 900),
            cache_read_input_tokens=rng.randint(0, 3),  # sub-micro-dollar amounts
        )
        await pay(client, records, f"t{i}", answer(settings, usage=usage))
    assert today() == day, "the test ran across midnight UTC: run it again"
    total = await read_one(client, settings, day)
    rates = PriceTable.from_settings(settings).on(day).rates("claude-haiku-5-5")
    assert rates is not None
    expected = total.input * rates.input + total.output * rates.output
    expected += total.cache_read * rates.cache_read
    assert total.cost_pico == expected
    assert total.requests == 300


async def test_days_and_minutes_are_kept_apart(
    ledger: Ledger, client: Redis, settings: Settings
) -> None:
    later = AT + datetime.timedelta(days=1, minutes=5)
    reason = answer(settings, task_type="reason", model="claude-sonnet-5-5")
    await ledger.record("a", ledger.charge(answer(settings), AT))
    await ledger.record("b", ledger.charge(reason, later))
    entries = await read_days(client, Keys(settings.prefix), [DAY, later.date()])
    assert [(r.day, r.type) for r in entries.rows] == [(DAY, "classify"), (later.date(), "reason")]
    assert [(m.at.isoformat(), m.tasks, m.cost_pico) for m in entries.minutes] == [
        ("2026-03-01T13:07:00+00:00", 1, 0),  # tasks in their minute; spend is the calls'
        ("2026-03-02T13:12:00+00:00", 1, 0),
    ]
    # A paid call's spend goes to the minute it was recorded in, without a task.
    before = datetime.datetime.now(datetime.UTC).replace(second=0, microsecond=0)
    await pay(client, records_for(client, settings, ledger), "b", reason)
    after = datetime.datetime.now(datetime.UTC).replace(second=0, microsecond=0)
    now = await read_days(client, Keys(settings.prefix), sorted({before.date(), after.date()}))
    assert [(m.tasks, m.cost_pico) for m in now.minutes] == [
        (0, price(settings, "claude-sonnet-5-5", day=after.date()))
    ]
    assert before <= now.minutes[0].at <= after
    unchanged = await read_days(client, Keys(settings.prefix), [DAY, later.date()])
    assert unchanged.minutes == entries.minutes


async def test_new_task_types_fold_into_other_past_the_field_limit(
    client: Redis, fast_env: dict[str, str]
) -> None:
    settings = load_settings(env={**fast_env, "PIPELINE_LEDGER__MAX_FIELDS": "40"})
    ledger = Ledger(client, Keys(settings.prefix), settings, Availability(settings.redis.url))
    records = records_for(client, settings, ledger)
    day = today()
    for i in range(30):  # as the pipeline counts them: the paid call, then the task
        paid = answer(settings, task_type=f"kind{i}")
        await pay(client, records, f"t{i}", paid)
        assert await ledger.record(f"t{i}", ledger.charge(paid))
    assert today() == day, "the test ran across midnight UTC: run it again"
    rows = (await read_days(client, Keys(settings.prefix), [day])).rows
    assert len(await client.hgetall(Keys(settings.prefix).ledger(day.isoformat()))) < 60
    assert "other" in {r.type for r in rows}
    # Nothing is lost, only grouped; and a task's part goes where its call's went.
    assert sum(r.totals.requests for r in rows) == 30
    sonnet = price(settings, "claude-sonnet-5-5", day=day)
    assert sum(r.totals.baseline_pico for r in rows) == 30 * sonnet
    for row in rows:
        assert row.totals.baseline_pico == row.totals.requests * sonnet, row.type


async def test_a_disabled_ledger_records_nothing(client: Redis, fast_env: dict[str, str]) -> None:
    settings = load_settings(env={**fast_env, "PIPELINE_LEDGER__ENABLED": "false"})
    ledger = Ledger(client, Keys(settings.prefix), settings, Availability(settings.redis.url))
    assert not await ledger.record("t1", ledger.charge(answer(settings), AT))
    assert await read_one(client, settings) == Totals()
    # still recorded:
    await pay(client, records_for(client, settings, ledger), "t1", answer(settings))
    assert await client.hget(Keys(settings.prefix).task("t1"), "answer") is not None
    assert await client.keys(Keys(settings.prefix).ledger("*")) == []


async def test_the_store_handler_run_twice_on_one_entry_counts_it_once(
    client: Redis, settings: Settings
) -> None:
    """A store entry redelivered after a crash between the ledger write and the hand-off."""
    services = Services(settings, client, Keys(settings.prefix))
    handler = await store.build(services)
    paid = answer(settings)
    day = today()
    # claude-call's part:
    await pay(
        client, records_for(client, settings, services.shared(Ledger.for_services)), "t1", paid
    )
    msg = message({"prompt": "Is this spam?", "type": "classify", "id": "t1"}, paid)
    assert msg.task_id == "t1"
    first = await handler(msg)
    again = await handler(msg)
    assert today() == day, "the test ran across midnight UTC: run it again"
    total = await read_one(client, settings, day)
    assert total.requests == 1
    expected = PriceTable.from_settings(settings).cost_pico("claude-haiku-5-5", USAGE, day)
    assert total.cost_pico == expected
    assert total.baseline_pico == price(settings, "claude-sonnet-5-5", day=day)  # once
    minutes = (await read_days(client, Keys(settings.prefix), [day])).minutes
    assert sum(m.tasks for m in minutes) == 1
    for outcome in (first, again):  # the result reports the same (rounded) cost
        assert outcome.result is not None  # type: ignore[union-attr]
        cost = outcome.result["cost_usd"]  # type: ignore[union-attr]
        assert cost == f"{micro_usd(expected) / 1e6:.6f}"
    assert set(METRICS) >= {"requests", "hits", "cost_pico", "saved_pico", "baseline_pico"}


async def test_each_paid_call_is_counted_once_per_claim_even_when_its_record_is_resent(
    ledger: Ledger, client: Redis, settings: Settings
) -> None:
    """A record resent after a lost reply (same claim) adds nothing; a second claim's call
    (a worker stalled past its lease called too) is counted, though its answer is not used."""
    records = records_for(client, settings, ledger)
    first = answer(settings)
    routed = Routed(request=first.request, family="haiku", model=first.model, max_tokens=64)
    await client.hset(records.keys.task("p1"), mapping={"holder": "x", "fence": 2})  # claims
    assert (await records.record("p1", routed, first, fence=1)).answer == first
    assert (await records.record("p1", routed, first, fence=1)).answer == first  # the resend
    late = msgspec.structs.replace(first, output="a later answer")
    # the first one wins
    assert (await records.record("p1", routed, late, fence=2)).answer == first
    total = await read_one(client, settings, today())
    assert total.requests == 2
    assert total.cost_pico == 2 * ledger.charge(first).totals.cost_pico


async def test_a_call_that_ends_after_its_task_expired_is_counted_and_revives_nothing(
    ledger: Ledger, client: Redis, settings: Settings
) -> None:
    """A process stalled past its lease answers after another worker answered the task and
    its result (and record) expired: the call was paid, so it is counted; the id stays free
    (no record with a week's TTL holding an answer nobody asked for)."""
    records = records_for(client, settings, ledger)
    paid = answer(settings)
    routed = Routed(request=paid.request, family="haiku", model=paid.model, max_tokens=64)
    claim = await records.record("gone", routed, paid, fence=3)
    assert claim.state is ClaimState.GONE and claim.answer is None
    assert not await client.exists(records.keys.task("gone"))
    assert (await read_one(client, settings, today())).requests == 1
