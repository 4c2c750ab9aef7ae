"""Coalescing (guarantee 5): identical requests in flight at once make one Claude call.

Real Redis, the fake Anthropic API, the claude-call handler as a worker builds it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from pipeline import Forward, Keys, Services, Settings, TransientError
from pipeline.fake_claude import FakeClaudeServer
from pipeline.flights import Flights, identity
from pipeline.redis_conn import Availability
from pipeline.stage import Handler
from pipeline.task import Answer, Request, Routed
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
    # Every task's answer is recorded against its own id, followers' too.
    keys = Keys(settings.prefix)
    for n in range(100):
        memo = await aredis.get(keys.memo(f"task-{n}"))
        assert memo is not None and msgspec.msgpack.decode(memo, type=Answer) == answers[n]
    # The flight is over: no lease left behind; the answer lingers only briefly.
    ident = identity(routed())
    assert ident is not None
    assert not await aredis.exists(keys.flight(ident))
    assert 0 < await aredis.pttl(keys.flight_answer(ident)) <= 15_000


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
    assert not late.body.coalesced and late.body.attempts == 1
    assert fake.stats()["requests_total"] == 2


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
    ident = identity(routed())
    assert ident is not None
    keys = Keys(settings.prefix)
    assert not await aredis.exists(keys.flight(ident)), "a failed call must release its flight"
    assert not await aredis.exists(keys.flight_answer(ident)), "an error is never published"
    assert await aredis.get(keys.memo("leader")) is None

    fake.update_config(server_error_rate=0.0)
    retried = await handle(message(routed(), task_id="leader", attempt=2))
    assert isinstance(retried, Forward) and retried.body.attempts == 2
    assert not retried.body.coalesced


async def test_a_follower_leads_when_the_leader_lets_go_without_an_answer(
    aredis: Redis, settings: Settings
) -> None:
    flights = Flights(aredis, Keys(settings.prefix), Availability(settings.redis.url), 3000)
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
    ident = identity(routed())
    assert ident is not None
    keys = Keys(settings.prefix)
    await aredis.set(keys.flight(ident), "dead-leader", px=1000)
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
