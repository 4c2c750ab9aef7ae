"""The Message Batches API as the real SDK sees it: lifecycle, results, paging, cancel,
delete, validation, injected errors and expiry, auth, and the counters tests rely on."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import aiohttp
import anthropic
import pytest

from pipeline.fake_claude import (
    FakeClaudeApp,
    FakeClaudeConfig,
    FakeClaudeServer,
    request_key,
    run_fake_claude_in_thread,
)

SONNET = "claude-sonnet-5"
WEATHER = {
    "name": "get_weather",
    "description": "Weather of a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Clocked = Callable[..., tuple[FakeClaudeServer, FakeClock]]


@pytest.fixture
def clocked() -> Iterator[Clocked]:
    """`clocked(**config)`: a fake whose batches run on a clock the test moves by hand (the
    wall clock follows it, so timestamps differ by exactly what the test moved)."""
    with contextlib.ExitStack() as stack:

        def start(**fields: Any) -> tuple[FakeClaudeServer, FakeClock]:
            clock = FakeClock()
            config = FakeClaudeConfig(**fields)
            state = FakeClaudeApp(config, clock=clock, wall=lambda: 1.7e9 + clock.now)
            server = stack.enter_context(run_fake_claude_in_thread(config, state=state))
            return server, clock

        yield start


def _params(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": SONNET,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": f"batch task number {i}"}],
        **extra,
    }


def _requests(n: int, prefix: str = "task") -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}-{i}", "params": _params(i)} for i in range(n)]


async def _raw(
    server: FakeClaudeServer, method: str, path: str, body: Any = None, key: str = "sk-test"
) -> tuple[int, Any]:
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"{server.base_url}{path}", json=body, headers=headers) as r,
    ):
        return r.status, await r.json(content_type=None)


async def _results(claude: Any, batch_id: str) -> list[Any]:
    return [line async for line in await claude.messages.batches.results(batch_id)]


def test_lifecycle_results_match_plain_calls(clocked: Clocked, make_client: Any) -> None:
    server, clock = clocked(batch_processing_s=60.0)
    requests = _requests(10)
    requests.append(  # a tool call and a stop sequence answer the same in a batch
        {"custom_id": "tool", "params": _params(10, tools=[WEATHER], tool_choice={"type": "any"})}
    )
    requests.append({"custom_id": "stop", "params": _params(11, stop_sequences=["the"])})

    async def scenario() -> tuple[Any, ...]:
        async with make_client(server) as claude:
            created = await claude.messages.batches.create(requests=requests)
            clock.now += 59.5
            early = await claude.messages.batches.retrieve(created.id)
            with pytest.raises(anthropic.AnthropicError, match="No `results_url`"):
                await claude.messages.batches.results(created.id)
            raw_early = await _raw(server, "GET", f"/v1/messages/batches/{created.id}/results")
            clock.now += 0.5
            ended = await claude.messages.batches.retrieve(created.id)
            results = await _results(claude, created.id)
            again = await _results(claude, created.id)
            plain = {r["custom_id"]: await claude.messages.create(**r["params"]) for r in requests}
            return created, early, raw_early, ended, results, again, plain

    created, early, raw_early, ended, results, again, plain = asyncio.run(scenario())
    assert created.id.startswith("msgbatch_") and created.type == "message_batch"
    assert created.processing_status == "in_progress"
    assert created.request_counts.model_dump() == {
        "processing": 12,
        "succeeded": 0,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert created.ended_at is None and created.results_url is None
    assert created.cancel_initiated_at is None and created.archived_at is None
    assert created.expires_at - created.created_at == timedelta(hours=24)
    assert early.processing_status == "in_progress" and early.request_counts.processing == 12
    assert raw_early[0] == 400 and raw_early[1]["error"]["type"] == "invalid_request_error"

    assert ended.processing_status == "ended"
    assert ended.request_counts.processing == 0 and ended.request_counts.succeeded == 12
    assert ended.ended_at - ended.created_at == timedelta(seconds=60)
    assert ended.results_url == f"{server.base_url}/v1/messages/batches/{created.id}/results"

    ids = [line.custom_id for line in results]
    assert sorted(ids) == sorted(r["custom_id"] for r in requests)
    assert ids != [r["custom_id"] for r in requests]  # not in request order
    assert [line.model_dump() for line in again] == [line.model_dump() for line in results]
    for line in results:
        assert line.result.type == "succeeded"
        message, same = line.result.message, plain[line.custom_id]
        assert message.id.startswith("msg_") and message.id != same.id
        assert message.usage.service_tier == "batch" and same.usage.service_tier == "standard"
        assert [block.model_dump() for block in message.content] == [
            block.model_dump() for block in same.content
        ]
        assert (message.stop_reason, message.stop_sequence) == (
            same.stop_reason,
            same.stop_sequence,
        )
        assert message.usage.input_tokens == same.usage.input_tokens
        assert message.usage.output_tokens == same.usage.output_tokens
    by_id = {line.custom_id: line.result.message for line in results}
    assert by_id["tool"].stop_reason == "tool_use" and by_id["stop"].stop_reason == "stop_sequence"

    stats = server.batch_stats()
    assert stats["created"] == 1 and stats["requests"] == 12 and stats["ended"] == 1
    assert stats["requests_by_custom_id"] == {r["custom_id"]: 1 for r in requests}
    assert stats["duplicate_custom_ids"] == 0
    assert stats["requests_by_batch"] == {created.id: 12}
    assert stats["results_downloads"] == {created.id: 2}
    assert stats["results"] == {"succeeded": 12, "errored": 0, "canceled": 0, "expired": 0}
    assert stats["succeeded_by_request"] == {request_key(r["params"]): 1 for r in requests}
    assert stats["usage"]["input_tokens"] == sum(m.usage.input_tokens for m in by_id.values())
    assert stats["usage"]["output_tokens"] == sum(m.usage.output_tokens for m in by_id.values())
    assert stats["usage_by_batch"][created.id] == stats["usage"]
    assert stats["params_seen"]["tools"] == 1 and stats["params_seen"]["model"] == 12
    assert stats["calls"]["create 200"] == 1 and stats["calls"]["results 400"] == 1
    # The batch's requests are no /v1/messages calls: only the 12 plain ones are there.
    assert server.stats()["succeeded"] == 12


def test_ends_on_the_real_clock(start_fake: Any, make_client: Any) -> None:
    server = start_fake(batch_processing_s=0.2)

    async def scenario() -> tuple[Any, list[Any]]:
        async with make_client(server) as claude:
            batch = await claude.messages.batches.create(requests=_requests(3))
            while batch.processing_status != "ended":
                await asyncio.sleep(0.05)
                batch = await claude.messages.batches.retrieve(batch.id)
            return batch, await _results(claude, batch.id)

    batch, results = asyncio.run(scenario())
    assert batch.request_counts.succeeded == 3
    assert sorted(line.custom_id for line in results) == ["task-0", "task-1", "task-2"]


def test_list_pages_newest_first(clocked: Clocked, make_client: Any) -> None:
    server, clock = clocked()

    async def scenario() -> tuple[Any, ...]:
        async with make_client(server) as claude:
            made = []
            for n in range(7):
                made.append(await claude.messages.batches.create(requests=_requests(1, f"b{n}")))
                clock.now += 1
            everything = [batch.id async for batch in claude.messages.batches.list(limit=3)]
            first = await claude.messages.batches.list(limit=3)
            after = await claude.messages.batches.list(limit=3, after_id=first.last_id)
            before = await claude.messages.batches.list(limit=2, before_id=after.first_id)
            back = [
                batch.id
                async for batch in claude.messages.batches.list(limit=2, before_id=made[0].id)
            ]
            clock.now += 2  # every batch has ended
            default = await claude.messages.batches.list()
            return made, everything, first, after, before, back, default

    made, everything, first, after, before, back, default = asyncio.run(scenario())
    newest_first = [batch.id for batch in reversed(made)]
    assert everything == newest_first
    assert [b.id for b in first.data] == newest_first[:3] and first.has_more is True
    assert (first.first_id, first.last_id) == (newest_first[0], newest_first[2])
    assert [b.id for b in after.data] == newest_first[3:6] and after.has_more is True
    assert [b.id for b in before.data] == newest_first[1:3] and before.has_more is True
    # Every batch newer than the oldest, in pages of 2 walking towards the newest.
    assert back == newest_first[4:6] + newest_first[2:4] + newest_first[0:2]
    assert [b.id for b in default.data] == newest_first and default.has_more is False
    assert {b.processing_status for b in first.data} == {"ended", "in_progress"}
    assert {b.processing_status for b in default.data} == {"ended"}

    async def bad(query: str) -> tuple[int, Any]:
        return await _raw(server, "GET", f"/v1/messages/batches?{query}")

    for query in ("limit=0", "limit=1001", "limit=x", f"after_id={made[0].id}&before_id=x"):
        status, body = asyncio.run(bad(query))
        assert status == 400 and body["error"]["type"] == "invalid_request_error", query
    status, body = asyncio.run(bad("after_id=msgbatch_nope"))
    assert status == 400 and "msgbatch_nope" in body["error"]["message"]
    status, body = asyncio.run(bad("limit=1000"))
    assert status == 200 and len(body["data"]) == 7 and body["has_more"] is False


def test_cancel_keeps_what_was_done(clocked: Clocked, make_client: Any) -> None:
    server, clock = clocked(batch_processing_s=10.0, batch_cancel_s=1.0)

    async def scenario() -> tuple[Any, ...]:
        async with make_client(server) as claude:
            batch = await claude.messages.batches.create(requests=_requests(10))
            clock.now += 3.5  # 3 of the 10 requests are done
            canceling = await claude.messages.batches.cancel(batch.id)
            clock.now += 0.5
            twice = await claude.messages.batches.cancel(batch.id)
            with pytest.raises(anthropic.BadRequestError, match="cannot be deleted"):
                await claude.messages.batches.delete(batch.id)
            clock.now += 0.5
            ended = await claude.messages.batches.retrieve(batch.id)
            results = await _results(claude, batch.id)
            with pytest.raises(anthropic.BadRequestError, match="already ended"):
                await claude.messages.batches.cancel(batch.id)
            deleted = await claude.messages.batches.delete(batch.id)
            with pytest.raises(anthropic.NotFoundError):
                await claude.messages.batches.retrieve(batch.id)
            gone = await _raw(server, "GET", f"/v1/messages/batches/{batch.id}/results")
            listed = [b.id async for b in claude.messages.batches.list()]
            return canceling, twice, ended, results, deleted, gone, listed

    canceling, twice, ended, results, deleted, gone, listed = asyncio.run(scenario())
    assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at
    assert canceling.request_counts.processing == 10 and canceling.results_url is None
    assert twice.processing_status == "canceling"
    assert twice.cancel_initiated_at == canceling.cancel_initiated_at
    assert ended.processing_status == "ended"
    assert ended.ended_at - ended.created_at == timedelta(seconds=4.5)
    counts = ended.request_counts
    assert (counts.succeeded, counts.canceled, counts.processing) == (3, 7, 0)
    kinds = [line.result.type for line in results]
    assert kinds == ["succeeded"] * 3 + ["canceled"] * 7  # results in processing order
    assert deleted.id == ended.id and deleted.type == "message_batch_deleted"
    assert gone[0] == 404 and gone[1]["error"]["type"] == "not_found_error"
    assert listed == []
    stats = server.batch_stats()
    assert stats["canceled"] == 1 and stats["deleted"] == 1
    assert stats["results"] == {"succeeded": 3, "errored": 0, "canceled": 7, "expired": 0}
    assert stats["calls"]["cancel 400"] == 1 and stats["calls"]["delete 400"] == 1


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        ([], "requests: List should have at least 1 item after validation, not 0"),
        (
            [{"custom_id": "a", "params": _params(0)}, {"custom_id": "a", "params": _params(1)}],
            "requests.1.custom_id: Duplicate custom_id 'a'",
        ),
        (
            [{"custom_id": "has space", "params": _params(0)}],
            "requests.0.custom_id: String should match pattern '^[a-zA-Z0-9_-]{1,64}$'",
        ),
        (
            [{"custom_id": "x" * 65, "params": _params(0)}],
            "requests.0.custom_id: String should have at most 64 characters",
        ),
        (
            [{"custom_id": "", "params": _params(0)}],
            "requests.0.custom_id: String should have at least 1 character",
        ),
        ([{"custom_id": "a"}], "requests.0.params: Field required"),
        ([{"params": _params(0)}], "requests.0.custom_id: Field required"),
        (
            [{"custom_id": "a", "params": _params(0), "x": 1}],
            "requests.0.x: Extra inputs are not permitted",
        ),
        ([{"custom_id": "a", "params": "hi"}], "requests.0.params: Input should be a valid"),
    ],
)
def test_create_refused(
    fake: FakeClaudeServer, make_client: Any, requests: list[Any], message: str
) -> None:
    async def create() -> Any:
        async with make_client(fake) as claude:
            return await claude.messages.batches.create(requests=requests)

    with pytest.raises(anthropic.BadRequestError) as caught:
        asyncio.run(create())
    assert caught.value.status_code == 400 and caught.value.type == "invalid_request_error"
    assert message in caught.value.message
    stats = fake.batch_stats()
    assert stats["created"] == 0 and stats["requests_by_custom_id"] == {}
    assert stats["calls"] == {"create 400": 1}


def test_size_limits(start_fake: Any, make_client: Any) -> None:
    server = start_fake(batch_max_requests=3, batch_max_body_bytes=2_000)

    async def create(requests: list[Any]) -> Any:
        async with make_client(server) as claude:
            return await claude.messages.batches.create(requests=requests)

    with pytest.raises(anthropic.BadRequestError, match="at most 3 items after validation, not 4"):
        asyncio.run(create(_requests(4)))
    big = [{"custom_id": "big", "params": _params(0, system="x" * 3_000)}]
    with pytest.raises(anthropic.APIStatusError) as caught:
        asyncio.run(create(big))
    assert caught.value.status_code == 413 and caught.value.type == "request_too_large"
    assert asyncio.run(create(_requests(3))).request_counts.processing == 3


INVALID = [
    (
        {"model": SONNET, "messages": [{"role": "user", "content": "x"}]},
        "max_tokens: Field required",
    ),
    (_params(0, stream=True), "stream: Input should be False"),
    (_params(0, speed="fast"), "speed: fast mode is not supported"),
    (_params(0, colour="red"), "colour: Extra inputs are not permitted"),
    (_params(0, max_tokens=0), "max_tokens: Input should be greater than or equal to 1"),
]


def test_invalid_params_error_their_request_only(clocked: Clocked, make_client: Any) -> None:
    server, clock = clocked(batch_processing_s=1.0)
    requests = [{"custom_id": f"bad-{i}", "params": p} for i, (p, _) in enumerate(INVALID)]
    requests += [*_requests(3), {"custom_id": "off", "params": _params(9, stream=False)}]

    async def scenario() -> tuple[Any, list[Any]]:
        async with make_client(server) as claude:
            batch = await claude.messages.batches.create(requests=requests)
            clock.now += 1
            return await claude.messages.batches.retrieve(batch.id), await _results(
                claude, batch.id
            )

    batch, results = asyncio.run(scenario())
    assert batch.request_counts.errored == len(INVALID)
    assert batch.request_counts.succeeded == 4  # `stream: false` is allowed
    by_id = {line.custom_id: line.result for line in results}
    for i, (_, message) in enumerate(INVALID):
        result = by_id[f"bad-{i}"]
        assert result.type == "errored" and result.error.type == "error"
        assert result.error.error.type == "invalid_request_error"
        assert message in result.error.error.message
    stats = server.batch_stats()
    assert stats["results"]["errored"] == len(INVALID)
    assert set(stats["succeeded_by_request"]) == {
        request_key(r["params"]) for r in requests if not r["custom_id"].startswith("bad")
    }


@pytest.mark.parametrize(
    ("index", "where"), [(0, "requests.0.params.max_tokens"), (1, "requests.0.params.stream")]
)
def test_invalid_params_refuse_the_create_when_asked(
    start_fake: Any, make_client: Any, index: int, where: str
) -> None:
    server = start_fake(batch_validate_at_create=True)
    params, message = INVALID[index]

    async def create() -> Any:
        async with make_client(server) as claude:
            return await claude.messages.batches.create(
                requests=[{"custom_id": "bad", "params": params}, *_requests(2)]
            )

    with pytest.raises(anthropic.BadRequestError) as caught:
        asyncio.run(create())
    assert f"{where}: " in caught.value.message
    assert message.split(": ", 1)[1] in caught.value.message
    assert server.batch_stats()["created"] == 0


def _outcomes(server: FakeClaudeServer, clock: FakeClock, make_client: Any) -> dict[str, Any]:
    async def scenario() -> tuple[Any, list[Any]]:
        async with make_client(server) as claude:
            batch = await claude.messages.batches.create(requests=_requests(400))
            clock.now += 2
            return await claude.messages.batches.retrieve(batch.id), await _results(
                claude, batch.id
            )

    batch, results = asyncio.run(scenario())
    kinds = Counter(line.result.type for line in results)
    counts = batch.request_counts
    assert dict(kinds) == {k: v for k, v in counts.model_dump().items() if v and k != "processing"}
    return {line.custom_id: line.result for line in results}


def test_error_and_expiry_rates(clocked: Clocked, make_client: Any) -> None:
    server, clock = clocked(batch_error_rate=0.25, batch_expire_rate=0.15, seed=3)
    outcomes = _outcomes(server, clock, make_client)
    kinds = Counter(result.type for result in outcomes.values())
    assert sum(kinds.values()) == 400
    assert 60 <= kinds["errored"] <= 140 and 30 <= kinds["expired"] <= 90
    for result in outcomes.values():
        if result.type == "errored":
            assert result.error.error.type == "api_error"
    stats = server.batch_stats()
    assert stats["results"] == {
        "canceled": 0,
        **{k: kinds[k] for k in ("succeeded", "errored", "expired")},
    }
    assert len(stats["succeeded_by_request"]) == kinds["succeeded"]
    # Only the succeeded requests are billed.
    billed = [r.message.usage for r in outcomes.values() if r.type == "succeeded"]
    assert stats["usage"]["output_tokens"] == sum(u.output_tokens for u in billed)

    # Same seed, same outcome for every custom_id.
    again, clock2 = clocked(batch_error_rate=0.25, batch_expire_rate=0.15, seed=3)
    assert {k: r.type for k, r in _outcomes(again, clock2, make_client).items()} == {
        k: r.type for k, r in outcomes.items()
    }


def test_expires_after_24_hours(clocked: Clocked, make_client: Any) -> None:
    server, clock = clocked(batch_processing_s=100_000.0)  # longer than the 24 h allowed

    async def scenario() -> tuple[Any, Any, list[Any]]:
        async with make_client(server) as claude:
            batch = await claude.messages.batches.create(requests=_requests(4))
            clock.now += 86_399
            before = await claude.messages.batches.retrieve(batch.id)
            clock.now += 1
            return (
                before,
                await claude.messages.batches.retrieve(batch.id),
                await _results(claude, batch.id),
            )

    before, ended, results = asyncio.run(scenario())
    assert before.processing_status == "in_progress"
    assert ended.processing_status == "ended" and ended.ended_at == ended.expires_at
    assert (ended.request_counts.succeeded, ended.request_counts.expired) == (3, 1)
    assert [line.result.type for line in results] == ["succeeded"] * 3 + ["expired"]


def test_auth(start_fake: Any, make_client: Any) -> None:
    server = start_fake(bad_keys=frozenset({"sk-bad"}), forbidden_keys=frozenset({"sk-no"}))

    async def calls(key: str) -> None:
        async with make_client(server, api_key=key) as claude:
            await claude.messages.batches.create(requests=_requests(1))

    with pytest.raises(anthropic.AuthenticationError) as caught:
        asyncio.run(calls("sk-bad"))
    assert caught.value.status_code == 401 and caught.value.type == "authentication_error"
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        asyncio.run(calls("sk-no"))
    assert denied.value.status_code == 403 and denied.value.type == "permission_error"
    for method, path in (
        ("GET", "/v1/messages/batches"),
        ("GET", "/v1/messages/batches/msgbatch_x"),
        ("POST", "/v1/messages/batches/msgbatch_x/cancel"),
        ("DELETE", "/v1/messages/batches/msgbatch_x"),
        ("GET", "/v1/messages/batches/msgbatch_x/results"),
    ):
        status, body = asyncio.run(_raw(server, method, path, key="sk-bad"))
        assert status == 401 and body["error"]["type"] == "authentication_error", path
        status, body = asyncio.run(_raw(server, method, path))
        assert status == (200 if path.endswith("batches") else 404), path
    assert server.batch_stats()["created"] == 0


def test_queue_limit_and_no_messages_rate_limit(clocked: Clocked, make_client: Any) -> None:
    server, clock = clocked(batch_queue_limit=5, batch_processing_s=30.0, rpm=1)

    async def scenario() -> tuple[Any, ...]:
        async with make_client(server) as claude:
            first = await claude.messages.batches.create(requests=_requests(3))
            assert first.request_counts.processing == 3
            clock.now += 10
            with pytest.raises(anthropic.RateLimitError) as refused:
                await claude.messages.batches.create(requests=_requests(3, "more"))
            # The batch's requests did not use the per-minute limit (rpm=1) of /v1/messages.
            message = await claude.messages.create(**_params(0))
            clock.now += 20
            second = await claude.messages.batches.create(requests=_requests(3, "more"))
            return refused.value, message, second

    refused, message, second = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.type == "rate_limit_error"
    assert refused.response.headers["retry-after"] == "20"
    assert message.type == "message" and second.processing_status == "in_progress"
    assert server.batch_stats()["calls"]["create 429"] == 1


def test_batches_share_the_prompt_cache(clocked: Clocked, make_client: Any) -> None:
    server, clock = clocked()
    system = [{"type": "text", "text": "policy " * 400, "cache_control": {"type": "ephemeral"}}]
    requests = [{"custom_id": f"c{i}", "params": _params(i, system=system)} for i in range(2)]

    async def scenario() -> list[Any]:
        async with make_client(server) as claude:
            batch = await claude.messages.batches.create(requests=requests)
            clock.now += 2
            return await _results(claude, batch.id)

    usages = [line.result.message.usage for line in asyncio.run(scenario())]
    assert usages[0].cache_creation_input_tokens == 700 and usages[0].cache_read_input_tokens == 0
    assert usages[1].cache_read_input_tokens == 700 and usages[1].cache_creation_input_tokens == 0
    usage = server.batch_stats()["usage"]
    assert usage["cache_creation_input_tokens"] == usage["cache_read_input_tokens"] == 700


def test_reset(clocked: Clocked, make_client: Any) -> None:
    server, clock = clocked()

    async def create() -> Any:
        async with make_client(server) as claude:
            return await claude.messages.batches.create(requests=_requests(2))

    batch = asyncio.run(create())
    server.reset()  # counters only: the batch lives on
    assert server.batch_stats()["created"] == 0
    clock.now += 2
    status, body = asyncio.run(_raw(server, "GET", f"/v1/messages/batches/{batch.id}"))
    assert status == 200 and body["processing_status"] == "ended"
    assert server.batch_stats()["results"]["succeeded"] == 2  # ended after the reset
    status, _ = asyncio.run(_raw(server, "POST", "/_fake/reset", {"batches": True}))
    assert status == 200
    status, body = asyncio.run(_raw(server, "GET", f"/v1/messages/batches/{batch.id}"))
    assert status == 404 and body["error"]["type"] == "not_found_error"
    assert server.batch_stats()["created"] == 0


def test_settings_apply_to_live_batches(clocked: Clocked, make_client: Any) -> None:
    server, _ = clocked(batch_processing_s=3600.0)

    async def create() -> Any:
        async with make_client(server) as claude:
            return await claude.messages.batches.create(requests=_requests(2))

    batch = asyncio.run(create())
    server.update_config(batch_processing_s=0.0)  # ends the live batch at once
    status, body = asyncio.run(_raw(server, "GET", f"/v1/messages/batches/{batch.id}"))
    assert status == 200 and body["processing_status"] == "ended"
    for bad in (
        {"batch_error_rate": 0.6, "batch_expire_rate": 0.5},
        {"batch_processing_s": -1.0},
        {"batch_queue_limit": 0},
        {"batch_max_requests": 0},
    ):
        with pytest.raises(ValueError):
            server.update_config(**bad)
