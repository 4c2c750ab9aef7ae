"""cache-check: validation, cache hits and misses; then all stages through the real runtime."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis
from redis.asyncio import Redis

from pipeline import (
    App,
    ConfigError,
    Drop,
    Forward,
    Handler,
    HandlerFactory,
    InvalidTask,
    Keys,
    Message,
    Outcome,
    Reject,
    Services,
    Settings,
    Stage,
    load_settings,
)
from pipeline.claude.cache import ResponseCache
from pipeline.claude.flights import Flights
from pipeline.claude.request import parse_request
from pipeline.claude.task import Answer, Request, Routed, Usage
from pipeline.runtime.redis_conn import Availability
from pipeline.runtime.wire import decode_entry
from stages import cache_check, router, store
from tests.helpers.outcomes import assert_drained, tally
from tests.helpers.workers import Workers

pytestmark = pytest.mark.anyio
FIELDS = {"prompt": "Is this spam?", "type": "classify"}


@pytest.fixture
async def client(redis_url: str, anyio_backend: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url)
    yield redis
    await redis.aclose()


def message(fields: dict[str, str]) -> Message:
    """An ingress entry as a producer's XADD leaves it."""
    entry_id = f"{int(time.time() * 1000)}-0"
    raw = {k.encode(): v.encode() for k, v in fields.items()}
    return Message(decode_entry(entry_id, raw, 1 << 22), entry_id, "cache-check", None, 1)


async def check(client: Redis, settings: Settings, fields: dict[str, str]) -> Forward:
    handler = await cache_check.build(Services(settings, client, Keys(settings.prefix)))
    outcome = await handler(message(fields))
    assert isinstance(outcome, Forward)
    return outcome


async def remember(client: Redis, settings: Settings, fields: dict[str, str]) -> Answer:
    """Put an answer for `fields` in the cache the way claude-call does: its flight's leader
    lands it (the cache's rules: `pipeline.claude.flights.cache_ttl_s`)."""
    request = parse_request(fields, settings)
    fresh = Answer(
        request=request,
        model="claude-haiku-5-5",
        output="spam",
        stop_reason="end_turn",
        usage=Usage(input_tokens=12, output_tokens=3, cache_read_input_tokens=7),
        attempts=2,
        call_ms=900,
    )
    routed = Routed(request=request, family="haiku", model=fresh.model, max_tokens=64)
    flights = Flights(client, Keys(settings.prefix), Availability(settings.redis.url), 3000,
                      settings)  # fmt: skip
    async with flights.board(routed, "leader") as flight:
        assert flight.answer is None
        await flight.land(fresh)
    return fresh


async def counters(client: Redis, settings: Settings) -> dict[str, int]:
    raw = await client.hgetall(Keys(settings.prefix).counters)
    return {k.decode(): int(v) for k, v in raw.items()}


async def test_a_miss_goes_to_the_router_with_the_parsed_request(
    client: Redis, settings: Settings
) -> None:
    fields = {**FIELDS, "ttl": "60", "user_id": "in the request, not carried"}
    outcome = await check(client, settings, fields)
    want = parse_request(fields, settings)
    # The request travels parsed; of the producer's fields only what later stages read.
    assert outcome == Forward("router", want, fields={"type": "classify", "ttl": "60"})
    assert isinstance(outcome.body, Request) and len(outcome.body.request_hash) == 32
    assert await counters(client, settings) == {"cache_misses": 1}


async def test_a_hit_goes_to_the_store_as_this_tasks_answer(
    client: Redis, settings: Settings
) -> None:
    fresh = await remember(client, settings, {**FIELDS, "metadata": '{"from": "first"}'})
    fields = {**FIELDS, "metadata": '{"from": "second"}', "id": "second"}
    outcome = await check(client, settings, fields)
    assert outcome.to == "store" and outcome.lane is None
    assert outcome.fields == {k: fields[k] for k in ("id", "type", "metadata")}
    assert outcome.body == Answer(
        # this task's own metadata, not the first's; not its prompt, which the store ignores
        request=msgspec.structs.replace(parse_request(fields, settings), messages=[]),
        model="claude-haiku-5-5",
        output="spam",
        stop_reason="end_turn",
        usage=fresh.usage,  # as recorded
        cached=True,
        attempts=0,
        call_ms=0,
    )
    assert await counters(client, settings) == {"cache_hits": 1}


async def test_cache_false_skips_the_lookup(client: Redis, settings: Settings) -> None:
    await remember(client, settings, FIELDS)
    outcome = await check(client, settings, {**FIELDS, "cache": "false"})
    assert outcome.to == "router"
    assert await counters(client, settings) == {}


async def test_a_disabled_cache_is_not_read(client: Redis, fast_env: dict[str, str]) -> None:
    settings = load_settings(env={**fast_env, "PIPELINE_CACHE__ENABLED": "false"})
    await client.set(
        Keys(settings.prefix).cache(parse_request(FIELDS, settings).request_hash), b"x"
    )
    assert (await check(client, settings, FIELDS)).to == "router"
    assert await counters(client, settings) == {}


@pytest.mark.parametrize(
    ("ttl_by_type", "ttl_s"),
    [({"classify": 604_800}, 604_800), ({"classify": True}, 3600), ({"other": 5}, 3600)],
)
async def test_answers_are_cached_for_their_types_ttl(
    client: Redis, fast_env: dict[str, str], ttl_by_type: dict[str, object], ttl_s: int
) -> None:
    settings = load_settings(env=fast_env, cache__ttl_s=3600, cache__ttl_by_type=ttl_by_type)
    fresh = await remember(client, settings, FIELDS)
    ttl = await client.ttl(Keys(settings.prefix).cache(fresh.request.request_hash))
    assert ttl_s - 5 <= ttl <= ttl_s
    assert (await check(client, settings, FIELDS)).to == "store"


@pytest.mark.parametrize("off", [0, False])
async def test_a_type_with_ttl_0_or_false_is_neither_written_nor_read(
    client: Redis, fast_env: dict[str, str], off: object
) -> None:
    settings = load_settings(env=fast_env, cache__ttl_by_type={"classify": off, "other": 60})
    fresh = await remember(client, settings, FIELDS)
    assert not await client.exists(Keys(settings.prefix).cache(fresh.request.request_hash))
    cached_elsewhere = load_settings(env=fast_env)  # an entry written under another config
    await remember(client, cached_elsewhere, FIELDS)
    assert (await check(client, settings, FIELDS)).to == "router"
    assert await counters(client, settings) == {}, "no lookup, so no hit or miss either"


def test_a_negative_type_ttl_fails_at_start(fast_env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"^config: cache.ttl_by_type.classify: -1 is negative"):
        load_settings(env=fast_env, cache__ttl_by_type={"classify": -1})


class CountingRedis(Redis):
    """A real client that records the commands it sends."""

    sent: list[str]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]).upper())
        return await super().execute_command(*args, **options)


async def test_the_lookup_and_its_count_are_one_round_trip(
    redis_url: str, client: Redis, settings: Settings
) -> None:
    counting = CountingRedis.from_url(redis_url)
    counting.sent = []
    try:
        cache = Services(settings, counting, Keys(settings.prefix)).shared(
            ResponseCache.for_services
        )
        await cache.get("0" * 32)  # the first call may load the script
        await client.set(Keys(settings.prefix).cache("1" * 32), b"x")
        counting.sent = []
        assert await cache.get("1" * 32) == b"x"
        assert await cache.get("2" * 32) is None
    finally:
        await counting.aclose()
    assert counting.sent == ["EVALSHA", "EVALSHA"]
    assert await counters(client, settings) == {"cache_misses": 2, "cache_hits": 1}


async def test_an_unreadable_cache_entry_is_a_miss(client: Redis, settings: Settings) -> None:
    request = parse_request(FIELDS, settings)
    await client.set(Keys(settings.prefix).cache(request.request_hash), b"\xc1garbage")
    assert await check(client, settings, FIELDS) == Forward(
        "router", request, fields={"type": "classify"}
    )


async def test_bad_input_raises_invalid_task_with_the_reason(
    client: Redis, settings: Settings
) -> None:
    handler = await cache_check.build(Services(settings, client, Keys(settings.prefix)))
    with pytest.raises(
        InvalidTask, match=r"^temperature: must be a number from 0 to 1, got 'hot'$"
    ):
        await handler(message({"prompt": "q", "temperature": "hot"}))
    with pytest.raises(InvalidTask, match=r"^prompt or messages: missing"):
        await handler(message({"type": "classify"}))


# ---- the stages together, through the real runtime ------------------------------------------

STAGES = ("cache-check", "router", "claude-call", "store")


def make_app(settings: Settings) -> App:
    """cache-check, router and store as shipped, plus a fake claude-call with fixed answers.

    A worker subprocess runs it (`--app tests.stages.test_cache_check:make_app`). Every
    handler run is counted in Redis (`runs:<stage>`, by task id). The fake cuts its answer at
    max_tokens when the prompt starts with "truncate". Like claude-call, it answers within
    its request's flight, whose leader fills the response cache as its answer lands.
    """

    async def fake_claude(services: Services) -> Handler:
        lease_ms = services.settings.runtime_for("claude-call").lease_ms
        flights = Flights(services.redis, services.keys, services.available, lease_ms,
                          services.settings)  # fmt: skip

        async def call(msg: Message) -> Outcome:
            routed = msg.body(Routed)
            prompt = routed.request.messages[0]["content"]
            async with flights.board(routed, msg.task_id) as flight:
                answer = flight.answer or Answer(
                    request=routed.request,
                    model=routed.model,
                    output=f"answer to {prompt}",
                    stop_reason="max_tokens" if prompt.startswith("truncate") else "end_turn",
                    usage=Usage(input_tokens=10, output_tokens=5),
                    attempts=1,
                    call_ms=3,
                )
                await flight.land(answer)
            return Forward("store", answer)

        return call

    return App(
        [
            Stage("cache-check", "tasks", build=_counted(cache_check.build)),
            Stage("router", "route", build=_counted(router.build)),
            Stage(
                "claude-call",
                "call",
                build=_counted(fake_claude),
                lanes=tuple(settings.claude.models),
            ),
            Stage("store", "store", build=_counted(store.build)),
        ]
    )


def _counted(build: HandlerFactory) -> HandlerFactory:
    async def counting_build(services: Services) -> Handler:
        inner = await build(services)
        client = Redis.from_url(services.settings.redis.url)
        services.on_close(client.aclose)

        async def handle(msg: Message) -> Outcome:
            await client.hincrby(services.keys.app_key(f"runs:{msg.stage}"), msg.task_id, 1)
            return await inner(msg)

        return handle

    return counting_build


async def submit_and_wait(client: Redis, keys: Keys, **fields: str) -> dict[str, str]:
    await client.xadd(keys.ingress, fields)  # type: ignore[arg-type]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        result = await client.hgetall(keys.result(fields["id"]))
        if result:
            return {k.decode(): v.decode() for k, v in result.items()}
        await asyncio.sleep(0.02)
    raise AssertionError(f"no result for {fields['id']} within 20 s")


async def test_the_stages_through_the_runtime(
    client: Redis, settings: Settings, workers: Workers, rclient: redis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    workers.app = f"{__name__}:make_app"
    worker = workers.start()
    first = await submit_and_wait(client, keys, id="a1", metadata='{"n": 1}', **FIELDS)
    again = await submit_and_wait(client, keys, id="a2", metadata='{"n": 2}', **FIELDS)
    bypass = await submit_and_wait(client, keys, id="a3", cache="false", **FIELDS)
    cut = await submit_and_wait(client, keys, id="t1", prompt="truncate me", ttl="120")
    cut_again = await submit_and_wait(client, keys, id="t2", prompt="truncate me")
    bad = await submit_and_wait(client, keys, id="bad", prompt="q", temperature="hot")
    unknown = await submit_and_wait(client, keys, id="gpt", prompt="q", model="gpt-4o", ttl="90")
    runs = tally(rclient, prefix, STAGES).runs

    # A fresh answer, then the identical task served from the cache: no router, no call.
    assert first["status"] == "completed" and first["cached"] == "false"
    assert (first["model"], first["output"]) == ("claude-haiku-5-5", "answer to Is this spam?")
    assert again["status"] == "completed" and again["cached"] == "true"
    assert (again["output"], again["attempts"]) == (first["output"], "0")
    assert float(again["cost_usd"]) == 0  # a cache hit costs nothing
    assert (again["input_tokens"], again["metadata"]) == ("10", '{"n": 2}')
    assert runs["router"]["a1"] == runs["claude-call"]["a1"] == 1
    assert runs["router"]["a2"] == runs["claude-call"]["a2"] == 0
    assert runs["cache-check"]["a2"] == runs["store"]["a2"] == 1
    # cache=false bypasses the cache although an entry exists.
    assert bypass["cached"] == "false" and runs["claude-call"]["a3"] == 1
    # An answer cut at max_tokens is stored but never cached.
    assert cut["stop_reason"] == "max_tokens" and cut["status"] == "completed"
    assert cut_again["cached"] == "false" and runs["claude-call"]["t2"] == 1
    # Bad input and an unknown model: a failed result with the reason, and a DLQ entry.
    assert bad["status"] == "failed"
    assert bad["error"] == "invalid task: temperature: must be a number from 0 to 1, got 'hot'"
    assert unknown["status"] == "failed"
    assert unknown["error"].startswith("unknown model 'gpt-4o': use auto, haiku, sonnet, opus")
    dlq = {}
    for _id, row in rclient.xrange(keys.dlq):
        entry = {k.decode(): v.decode() for k, v in row.items() if k != b"entry"}
        dlq[entry["task_id"]] = entry
    assert sorted(dlq) == ["bad", "gpt"]
    assert (dlq["bad"]["stage"], dlq["bad"]["error"]) == ("cache-check", bad["error"])
    assert (dlq["gpt"]["stage"], dlq["gpt"]["error"]) == ("router", unknown["error"])
    assert runs["router"]["bad"] == 0 and runs["claude-call"]["gpt"] == 0

    tally(rclient, prefix).assert_exactly_once(["a1", "a2", "a3", "t1", "t2", "bad", "gpt"])
    # Every result, completed or failed, lives for its task's `ttl`, else results.ttl_s.
    for task_id, ttl in {"t1": 120, "gpt": 90, "a1": settings.results.ttl_s,
                         "bad": settings.results.ttl_s}.items():  # fmt: skip
        assert ttl - 60 < rclient.ttl(keys.result(task_id)) <= ttl, task_id
    # Each producer id was admitted by its entry; its record now expires with its result.
    for task_id in ("a1", "a2", "a3", "t1", "t2"):
        assert rclient.hget(keys.task(task_id), "entry") is not None, task_id
        assert 0 < rclient.ttl(keys.task(task_id)) <= settings.results.ttl_s, task_id
    streams = ("tasks", "route", "store", *(f"call:{f}" for f in settings.claude.models))
    assert_drained(rclient, prefix, streams)
    assert worker.proc.poll() is None, worker.log()


# ---- producer ids (idempotency keys) -------------------------------------------------------


def _at(msg: Message, entry_id: str, origin_id: str = "") -> Message:
    """The same task read as another ingress entry (a retry re-enqueues it, a producer
    re-submits it): `origin_id` set means it came back through the runtime's retry path."""
    env = msgspec.structs.replace(msg.envelope, origin_id=origin_id)
    return Message(env, entry_id, "cache-check", None, 1)


async def test_a_retried_ingress_entry_keeps_its_admitted_id(
    client: Redis, settings: Settings
) -> None:
    """Regression: a retry out of cache-check comes back as a new entry of the ingress; it
    must still own the id it was admitted with, or the task is dropped and never answered."""
    handler = await cache_check.build(Services(settings, client, Keys(settings.prefix)))
    first = message({**FIELDS, "id": "job-1"})
    assert isinstance(await handler(first), Forward)
    retried = _at(first, "99-0", origin_id=first.entry_id)
    assert isinstance(await handler(retried), Forward), "a retry of the owner goes on"
    again = _at(first, "100-0")  # a producer's second submission: a new origin
    assert isinstance(await handler(again), Drop)


async def test_an_invalid_entry_reusing_a_live_id_is_rejected_not_failed_under_it(
    client: Redis, settings: Settings
) -> None:
    """Regression: admission comes before validation, so an invalid entry with a live task's
    id is refused without a `failed` result that would replace the live task's answer."""
    handler = await cache_check.build(Services(settings, client, Keys(settings.prefix)))
    assert isinstance(await handler(message({**FIELDS, "id": "job-2"})), Forward)
    bad = message({"id": "job-2", "prompt": "q", "temperature": "hot"})
    outcome = await handler(bad)
    assert isinstance(outcome, Reject) and "already in use" in outcome.reason
    with pytest.raises(InvalidTask):  # a fresh id is validated as ever
        await handler(message({"id": "job-3", "prompt": "q", "temperature": "hot"}))


async def test_the_trace_context_is_not_part_of_a_tasks_identity(
    client: Redis, settings: Settings
) -> None:
    handler = await cache_check.build(Services(settings, client, Keys(settings.prefix)))
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert isinstance(await handler(message({**FIELDS, "id": "job-4"})), Forward)
    resent = message({**FIELDS, "id": "job-4", "traceparent": parent})
    assert isinstance(await handler(_at(resent, "101-0")), Drop)
