"""Coalescing (the "Paid work is done once" guarantee): identical requests in flight at once
make one Claude call; and the response cache, which the flight leader fills as its answer lands.

Real Redis, the fake Anthropic API, the claude-call handler as a worker builds it.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from pipeline import Forward, Keys, Services, Settings, TransientError, load_settings
from pipeline.claude.flights import Flights, identity
from pipeline.claude.ledger import read_days
from pipeline.claude.ratelimit import RateLimiter
from pipeline.claude.task import Answer, Request, Routed, Usage
from pipeline.claude.task_record import binding
from pipeline.fake_claude import FakeClaudeServer
from pipeline.runtime.redis_conn import Availability
from pipeline.runtime.stage import Handler
from stages import claude_call
from tests.conftest import StartFake
from tests.stages.test_claude_call import KEY, message, stage_settings

pytestmark = pytest.mark.anyio
SONNET = "claude-sonnet-5-5"


def routed(n: int = 0, *, cache: bool = True, prompt: str = "What is 2+2?", **kw: Any) -> Routed:
    """Task `n`'s request: identical to every other's (same hash), its own metadata."""
    request = Request(
        messages=[{"role": "user", "content": prompt}],
        cache=cache,
        metadata=f'{{"n": {n}}}',
        request_hash=f"hash-of-{prompt}",
    )
    return Routed(request=request, family="sonnet", model=SONNET, max_tokens=64, **kw)


def flights_for(aredis: Redis, settings: Settings) -> Flights:
    return Flights(aredis, Keys(settings.prefix), Availability(settings.redis.url), 3000, settings)


def flight_keys(keys: Keys, routed: Routed) -> tuple[str, str]:
    ident = identity(routed)
    assert ident is not None
    return keys.flight(*ident), keys.flight_answer(*ident)


def unpack(raw: object) -> Answer:
    """An answer as a task record, flight or cache entry keeps it."""
    assert isinstance(raw, bytes), raw
    return msgspec.msgpack.decode(raw, type=Answer)


async def paid_calls(aredis: Redis, keys: Keys) -> int:
    """Paid calls counted in today's cost ledger."""
    today = datetime.datetime.now(datetime.UTC).date()
    return sum(row.totals.requests for row in (await read_days(aredis, keys, [today])).rows)


@pytest.fixture
async def handler_for(
    aredis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Any]:
    """`await handler_for(fake)`: claude-call's handler, against `fake`."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    opened: list[Services] = []

    async def build(fake: FakeClaudeServer) -> Handler:
        services = Services(stage_settings(settings, fake), aredis, Keys(settings.prefix))
        opened.append(services)
        return await claude_call.build(services)

    yield build
    for services in opened:
        await services.aclose()


async def test_a_hundred_identical_tasks_in_flight_make_one_call(
    start_fake: StartFake, handler_for: Any, aredis: Redis, settings: Settings
) -> None:
    fake = start_fake(latency_ms=1000)
    handle = await handler_for(fake)
    msgs = [message(routed(n), task_id=f"task-{n}") for n in range(100)]
    outcomes = await asyncio.gather(*(handle(m) for m in msgs))

    assert fake.stats()["requests_total"] == 1
    answers = [o.body for o in outcomes if isinstance(o, Forward) and o.to == "store"]
    assert len(answers) == 100 and all(isinstance(a, Answer) for a in answers)
    leaders = [a for a in answers if not a.coalesced]
    assert len(leaders) == 1 and leaders[0].attempts == 1 and not leaders[0].cached
    for n, answer in enumerate(answers):
        assert answer.output == leaders[0].output
        assert answer.request.metadata == f'{{"n": {n}}}', "each task keeps its own request"
        if answer is not leaders[0]:
            assert answer.cached and answer.coalesced and answer.attempts == 0
            assert answer.call_ms == 0 and answer.usage == leaders[0].usage
    # Every task's answer is recorded against its own id and call, followers' too; only the
    # leader's call was paid (and counted).
    keys = Keys(settings.prefix)
    for n in range(100):
        recorded = await aredis.hmget(keys.task(f"task-{n}"), "answer", "req")
        assert recorded[0] is not None and recorded[1] == binding(routed(n)).encode()
        assert unpack(recorded[0]) == answers[n].bare()
    assert await paid_calls(aredis, keys) == 1
    # The flight is over: no lease left behind; the answer lingers only briefly, without
    # the prompt. Cut at max_tokens, it is not cached.
    flight, published = flight_keys(keys, routed())
    assert not await aredis.exists(flight)
    assert 0 < await aredis.pttl(published) <= 15_000
    shared = unpack(await aredis.hget(published, "answer"))
    assert shared == leaders[0].bare() and shared.stop_reason == "max_tokens"
    assert not await aredis.exists(keys.cache(routed().request.request_hash))


async def test_tasks_that_refuse_the_cache_are_each_called(
    start_fake: StartFake, handler_for: Any
) -> None:
    fake = start_fake(latency_ms=300)
    handle = await handler_for(fake)
    msgs = [message(routed(n, cache=False), task_id=f"fresh-{n}") for n in range(5)]
    outcomes = await asyncio.gather(*(handle(m) for m in msgs))
    assert fake.stats()["requests_total"] == 5
    assert all(isinstance(o, Forward) and not o.body.coalesced for o in outcomes)


async def test_a_task_arriving_after_the_answer_makes_its_own_call(
    start_fake: StartFake, handler_for: Any
) -> None:
    """Not in flight at the same time: the answer (maybe cut at max_tokens) is not reused."""
    fake = start_fake()
    handle = await handler_for(fake)
    early = await handle(message(routed(0), task_id="early"))
    late = await handle(message(routed(1), task_id="late"))
    assert isinstance(early, Forward) and isinstance(late, Forward)
    assert early.body.stop_reason == "max_tokens"  # so the cache may not serve it either
    assert not late.body.coalesced and not late.body.cached and late.body.attempts == 1
    assert fake.stats()["requests_total"] == 2


async def test_a_task_arriving_after_a_complete_answer_is_served_from_the_cache(
    start_fake: StartFake, handler_for: Any, aredis: Redis, settings: Settings
) -> None:
    """The leader's complete answer lands in the cache as it is published: a task a moment
    later (past the cache check) takes it instead of leading a second call."""
    fake = start_fake(max_output_tokens=40)  # every answer ends by itself within 64 tokens
    handle = await handler_for(fake)
    early = await handle(message(routed(0), task_id="early"))
    late = await handle(message(routed(1), task_id="late"))
    assert isinstance(early, Forward) and isinstance(late, Forward)
    assert early.body.stop_reason == "end_turn" and not early.body.cached
    assert late.body == early.body.served_for(routed(1).request).to_store()  # its own, no call
    assert not late.body.coalesced and late.body.attempts == 0
    assert fake.stats()["requests_total"] == 1
    keys = Keys(settings.prefix)
    assert await paid_calls(aredis, keys) == 1
    late_record = await aredis.hget(keys.task("late"), "answer")
    assert unpack(late_record) == late.body.bare()
    # The cache entry is the leader's answer without its prompt, for the type's TTL.
    request_hash = routed().request.request_hash
    cached = unpack(await aredis.get(keys.cache(request_hash)))
    assert cached == early.body.bare() and cached.request.messages == []
    ttl = await aredis.ttl(keys.cache(request_hash))
    assert settings.cache.ttl_s - 5 <= ttl <= settings.cache.ttl_s


async def test_different_models_or_max_tokens_are_different_flights() -> None:
    base = routed()
    assert identity(base) == identity(routed(7))
    assert identity(base) != identity(msgspec.structs.replace(base, max_tokens=65))
    assert identity(base) != identity(msgspec.structs.replace(base, model="claude-haiku-5-5"))
    assert identity(routed(cache=False)) is None


async def test_a_failed_leader_lets_go_and_its_error_path_is_unchanged(
    start_fake: StartFake, handler_for: Any, aredis: Redis, settings: Settings
) -> None:
    fake = start_fake(server_error_rate=1.0)
    handle = await handler_for(fake)
    with pytest.raises(TransientError):
        await handle(message(routed(), task_id="leader"))
    keys = Keys(settings.prefix)
    flight, published = flight_keys(keys, routed())
    assert not await aredis.exists(flight), "a failed call must release its flight"
    assert not await aredis.exists(published), "an error is never published"
    assert not await aredis.exists(keys.cache(routed().request.request_hash)), "nor cached"
    # The claim was taken, but no answer recorded and no paid call counted.
    assert await aredis.hmget(keys.task("leader"), "answer", "fence") == [None, b"1"]
    assert await paid_calls(aredis, keys) == 0

    fake.update_config(server_error_rate=0.0)
    retried = await handle(message(routed(), task_id="leader", attempt=2))
    assert isinstance(retried, Forward) and retried.body.attempts == 2
    assert not retried.body.coalesced
    assert await aredis.hget(keys.task("leader"), "fence") == b"2", "the retry's own claim"


async def test_a_follower_leads_when_the_leader_lets_go_without_an_answer(
    aredis: Redis, settings: Settings
) -> None:
    flights = flights_for(aredis, settings)
    entered = asyncio.Event()

    async def leader_fails() -> None:
        async with flights.board(routed(), "leader") as flight:
            assert flight.answer is None
            entered.set()
            await asyncio.sleep(0.3)
            raise RuntimeError("the call failed")

    async def follower() -> bool:
        await entered.wait()
        async with flights.board(routed(1), "follower") as flight:
            return flight.answer is None  # leads

    lead, follow = await asyncio.gather(leader_fails(), follower(), return_exceptions=True)
    assert isinstance(lead, RuntimeError)
    assert follow is True


async def test_followers_are_not_stranded_when_the_leaders_lease_lapses(
    start_fake: StartFake, handler_for: Any, aredis: Redis, settings: Settings
) -> None:
    """A leader that died mid-call holds a lease nobody renews: a follower calls instead."""
    keys = Keys(settings.prefix)
    flight, _ = flight_keys(keys, routed())
    await aredis.set(flight, "dead-leader", px=1000)
    fake = start_fake()
    handle = await handler_for(fake)
    started = asyncio.get_running_loop().time()
    outcomes = await asyncio.gather(
        *(handle(message(routed(n), task_id=f"orphan-{n}")) for n in range(10))
    )
    waited = asyncio.get_running_loop().time() - started
    assert 0.5 < waited < 5, f"followers waited {waited:.1f}s for a 1s lease"
    assert fake.stats()["requests_total"] == 1
    assert sum(1 for o in outcomes if isinstance(o, Forward) and not o.body.coalesced) == 1


@pytest.mark.parametrize("leader_answers_first", [False, True], ids=["in-flight", "landed"])
async def test_a_leader_that_lost_its_lead_before_sending_follows_instead_of_paying(
    start_fake: StartFake,
    handler_for: Any,
    aredis: Redis,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    leader_answers_first: bool,
) -> None:
    """A CPU-starved worker (benchmarks/paid_once_chaos.py on a loaded 2-core machine): task
    `a` leads, waits for admission, and its flight lease lapses unrenewed; task `b`, following,
    takes the lead; `a` learns it (its renewer finds `b` holding the flight), and only then is
    its call admitted. Sending it would pay twice for one request: `a` follows `b` instead,
    whether `b`'s call is still in flight or has landed by then."""
    gate = asyncio.Event()
    waiting = asyncio.Event()
    acquire = RateLimiter.acquire

    async def admission_held_for_the_first(self: RateLimiter, *args: Any) -> Any:
        if not waiting.is_set():  # `a`'s call, the first to ask: held until the gate opens
            waiting.set()
            await gate.wait()
        return await acquire(self, *args)

    monkeypatch.setattr(RateLimiter, "acquire", admission_held_for_the_first)
    keys = Keys(settings.prefix)
    flight, published = flight_keys(keys, routed())
    fake = start_fake(latency_ms=2000)  # `b`'s call: longer than `a`'s renewals' period
    handle = await handler_for(fake)
    a = asyncio.create_task(handle(message(routed(0), task_id="a")))
    await asyncio.wait_for(waiting.wait(), 5)
    assert await aredis.get(flight) == b"a"
    b = asyncio.create_task(handle(message(routed(1), task_id="b")))
    await asyncio.sleep(0.2)  # `b` follows, polling
    assert not b.done() and await aredis.get(flight) == b"a"
    # `a`'s lease lapsed and `b`'s next poll took the lead (what a starved event loop does).
    await aredis.set(flight, "b", px=3000)
    deadline = asyncio.get_running_loop().time() + 5
    while "flight of task a: lease lapsed" not in caplog.text:
        assert asyncio.get_running_loop().time() < deadline, "a's renewer never noticed"
        await asyncio.sleep(0.05)
    if leader_answers_first:
        while not await aredis.exists(published):
            assert asyncio.get_running_loop().time() < deadline + 5, "b never landed"
            await asyncio.sleep(0.05)
    gate.set()  # `a`'s call is admitted only now
    outcomes = await asyncio.gather(a, b)

    assert fake.stats()["requests_total"] == 1, "one request, one paid call"
    answers = [o.body for o in outcomes if isinstance(o, Forward) and o.to == "store"]
    assert len(answers) == 2 and all(isinstance(x, Answer) for x in answers)
    assert answers[0].output == answers[1].output
    assert [x.coalesced for x in answers] == [True, False], "b called, a followed"
    assert answers[0].request.metadata == '{"n": 0}', "a keeps its own request"
    assert await paid_calls(aredis, keys) == 1
    assert not await aredis.exists(flight), "nobody is left leading"


async def test_a_leader_renews_its_lease_through_a_long_call(
    start_fake: StartFake, handler_for: Any, aredis: Redis, settings: Settings
) -> None:
    """Lease 3 s (the fast test settings), call 5 s: the lease must not lapse mid-call."""
    assert settings.runtime_for("claude-call").lease_ms == 3000
    fake = start_fake(latency_ms=5000)
    handle = await handler_for(fake)
    first = asyncio.create_task(handle(message(routed(0), task_id="slow-leader")))
    await asyncio.sleep(4.0)
    late = await handle(message(routed(1), task_id="late-follower"))
    await first
    assert isinstance(late, Forward) and late.body.coalesced
    assert fake.stats()["requests_total"] == 1


# ---- the response cache, filled as a leader lands (the rules the store used to apply) ----


def fresh_answer(routed: Routed, **changes: Any) -> Answer:
    values: dict[str, Any] = {
        "request": routed.request,
        "model": routed.model,
        "output": "4",
        "stop_reason": "end_turn",
        "usage": Usage(input_tokens=12, output_tokens=3, cache_read_input_tokens=5),
        "attempts": 1,
        "call_ms": 800,
    }
    values.update(changes)
    return Answer(**values)


async def lead_and_land(flights: Flights, routed: Routed, answer: Answer) -> None:
    async with flights.board(routed, "leader") as flight:
        assert flight.answer is None, "nothing in flight or cached: this task leads"
        await flight.land(answer)


@pytest.mark.parametrize("stop_reason", ["end_turn", "stop_sequence", "tool_use"])
async def test_a_complete_answer_is_cached_without_its_prompt(
    aredis: Redis, settings: Settings, stop_reason: str
) -> None:
    task = routed(7)
    fresh = fresh_answer(task, stop_reason=stop_reason)
    await lead_and_land(flights_for(aredis, settings), task, fresh)
    key = Keys(settings.prefix).cache(task.request.request_hash)
    raw = await aredis.get(key)
    assert raw is not None and b"role" not in raw  # no message of the prompt
    cached = unpack(raw)
    assert (cached.output, cached.model, cached.usage) == ("4", fresh.model, fresh.usage)
    assert (cached.stop_reason, cached.attempts, cached.call_ms) == (stop_reason, 1, 800)
    assert cached.request.messages == [] and cached.request.metadata == "{}"
    assert cached.request.request_hash == task.request.request_hash
    assert cached == fresh.bare()
    ttl = await aredis.ttl(key)
    assert settings.cache.ttl_s - 5 <= ttl <= settings.cache.ttl_s
    # The next identical task, whatever its own metadata, is served from it.
    async with flights_for(aredis, settings).board(routed(8), "next") as flight:
        assert flight.answer == fresh.served_for(routed(8).request)


@pytest.mark.parametrize(
    "changes",
    [
        *({"stop_reason": r} for r in
          ("max_tokens", "refusal", "pause_turn", "model_context_window_exceeded", "new")),
        {"output": ""},
        {"usage": Usage(input_tokens=9, output_tokens=3, server_tool_requests=1)},  # web search
        {"cached": True, "attempts": 0, "call_ms": 0},  # a hit is never written back
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())[:40],
)  # fmt: skip
async def test_incomplete_empty_or_served_answers_are_published_but_not_cached(
    aredis: Redis, settings: Settings, changes: dict[str, Any]
) -> None:
    task = routed()
    await lead_and_land(flights_for(aredis, settings), task, fresh_answer(task, **changes))
    keys = Keys(settings.prefix)
    _, published = flight_keys(keys, task)
    assert await aredis.hget(published, "answer") is not None, "followers still share it"
    assert not await aredis.exists(keys.cache(task.request.request_hash))


async def test_cache_false_tasks_fly_alone_and_are_not_cached(
    aredis: Redis, settings: Settings
) -> None:
    task = routed(cache=False)
    async with flights_for(aredis, settings).board(task, "alone") as flight:
        assert flight.answer is None
        await flight.land(fresh_answer(task))
    assert await aredis.keys(f"{settings.prefix}:*") == []


async def test_nothing_is_cached_or_read_from_the_cache_when_it_is_off(
    aredis: Redis, fast_env: dict[str, str]
) -> None:
    settings = load_settings(env={**fast_env, "PIPELINE_CACHE__ENABLED": "false"})
    task = routed()
    key = Keys(settings.prefix).cache(task.request.request_hash)
    await lead_and_land(flights_for(aredis, settings), task, fresh_answer(task))
    assert not await aredis.exists(key)
    on = load_settings(env=fast_env)  # an entry written while the cache was on
    await lead_and_land(flights_for(aredis, on), task, fresh_answer(task))
    assert await aredis.exists(key)
    await lead_and_land(flights_for(aredis, settings), task, fresh_answer(task))  # leads


async def test_an_answer_recorded_by_a_process_that_died_before_landing_it_still_serves(
    start_fake: StartFake, handler_for: Any, aredis: Redis, settings: Settings
) -> None:
    """The process paid, recorded the answer with the task, and was killed before landing
    its flight (publishing to the cache). Its entry's redelivery publishes the recorded
    answer, so a later identical request takes it instead of paying again."""
    fake = start_fake(max_output_tokens=40)  # complete answers: cacheable
    handle = await handler_for(fake)
    first = await handle(message(routed(0), task_id="died"))
    assert isinstance(first, Forward) and fake.stats()["requests_total"] == 1
    keys = Keys(settings.prefix)
    request_hash = routed().request.request_hash
    await aredis.delete(keys.cache(request_hash))  # as if it never landed

    again = await handle(message(routed(0), task_id="died", attempt=2))
    assert isinstance(again, Forward) and again.body == first.body
    assert await aredis.exists(keys.cache(request_hash)), "the redelivery published it"
    later = await handle(message(routed(1), task_id="later"))
    assert isinstance(later, Forward) and later.body.attempts == 0
    assert fake.stats()["requests_total"] == 1
    assert await paid_calls(aredis, keys) == 1


async def test_followers_take_the_answer_a_dead_leader_recorded_instead_of_paying_again(
    start_fake: StartFake, handler_for: Any, aredis: Redis, settings: Settings
) -> None:
    """The leader paid and recorded its answer with its task, then was killed before landing
    its flight. Its followers see its lease lapse; the one that takes over reads the dead
    leader's record first, finds the answer to this very call, and publishes it: no call."""
    fake = start_fake()
    handle = await handler_for(fake)
    first = await handle(message(routed(0), task_id="dead"))
    assert isinstance(first, Forward) and fake.stats()["requests_total"] == 1
    keys = Keys(settings.prefix)
    flight, published = flight_keys(keys, routed())
    await aredis.delete(published)  # as if it never landed …
    await aredis.set(flight, "dead", px=1000)  # … and died holding its flight

    outcomes = await asyncio.gather(
        *(handle(message(routed(n), task_id=f"waiting-{n}")) for n in range(1, 6))
    )
    assert fake.stats()["requests_total"] == 1, "the recorded answer was paid for once"
    for n, outcome in enumerate(outcomes, start=1):
        assert isinstance(outcome, Forward) and outcome.body.output == first.body.output
        assert outcome.body.coalesced and outcome.body.request.metadata == f'{{"n": {n}}}'
    assert await paid_calls(aredis, keys) == 1


async def test_a_task_arriving_after_a_dead_leaders_lease_lapsed_takes_its_recorded_answer(
    start_fake: StartFake, handler_for: Any, aredis: Redis, settings: Settings
) -> None:
    """The leader paid and recorded its answer, then was killed before landing its flight
    or the cache, and its lease lapsed with nobody following. A task with the same request
    arriving before the dead task's redelivery leads a new flight, but is told who led it
    last and never landed: it reads that record and publishes the answer instead of paying.
    (The chaos test found this: the same request paid twice, one answer recorded.)"""
    fake = start_fake()
    handle = await handler_for(fake)
    first = await handle(message(routed(0), task_id="dead"))
    assert isinstance(first, Forward) and fake.stats()["requests_total"] == 1
    keys = Keys(settings.prefix)
    ident = identity(routed())
    assert ident is not None
    flight, published = flight_keys(keys, routed())
    await aredis.delete(published, keys.cache(first.body.request.request_hash), flight)
    await aredis.set(keys.flight_led(*ident), "dead", px=60_000)  # led, never landed

    later = await handle(message(routed(1), task_id="later"))
    assert fake.stats()["requests_total"] == 1, "the recorded answer was paid for once"
    assert isinstance(later, Forward) and later.body.output == first.body.output
    assert later.body.request.metadata == '{"n": 1}'
    assert await paid_calls(aredis, keys) == 1
    assert not await aredis.exists(keys.flight_led(*ident)), "landed: nobody to look up"
