"""The producer client on a real Redis: wire fields, validation, backpressure, batching, waits."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator

import msgspec
import pytest
import redis

from pipeline.claude.config import load_settings
from pipeline.claude.request import parse_request
from pipeline.claude.settings import IngressSettings, Settings
from pipeline.client import BATCH_SIZE, Client, SubmitFailed, task_fields
from pipeline.runtime.errors import Backpressure, ConfigError, InvalidTask, RedisUnavailable
from pipeline.runtime.keys import Keys
from pipeline.runtime.results import make_result
from tests.helpers.cut_proxy import Cut, CutProxy
from tests.helpers.redis_server import RedisServer, free_port

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with Client.from_settings(settings) as c:
        yield c


def entries(rclient: redis.Redis, keys: Keys) -> list[tuple[str, dict[str, str]]]:
    return [
        (i.decode(), {k.decode(): v.decode() for k, v in f.items()})
        for i, f in rclient.xrange(keys.ingress)
    ]


def complete(rclient: redis.Redis, keys: Keys, task_id: str, output: str = "ok") -> None:
    """What the store's hand-off writes: the result hash, then a done event."""
    pipe = rclient.pipeline(transaction=True)
    pipe.hset(keys.result(task_id), mapping=make_result("completed", output=output))
    pipe.xadd(keys.done, {"id": task_id, "status": "completed"})
    pipe.execute()


async def until_waiting(client: Client, n: int, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if client.waiting >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{client.waiting} waiters, expected {n}")


def named_connections(rclient: redis.Redis, name: str) -> int:
    return sum(1 for c in rclient.client_list() if c.get("name") == name)


# ---- submit -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_submit_writes_exactly_the_wire_fields(client: Client, rclient: redis.Redis) -> None:
    task_id = await client.submit(
        "Summarise this",
        system="Be brief",
        model="haiku",
        max_tokens=200,
        temperature=0.5,
        type="summarise",
        id="task-1",
        cache=False,
        ttl=600,
        metadata={"user": "ann", "n": 1},
        traceparent=TRACEPARENT,
    )
    assert task_id == "task-1"
    [(_, fields)] = entries(rclient, client.keys)
    assert fields == {
        "prompt": "Summarise this",
        "system": "Be brief",
        "model": "haiku",
        "max_tokens": "200",
        "temperature": "0.5",
        "type": "summarise",
        "id": "task-1",
        "cache": "false",
        "ttl": "600",
        "metadata": '{"user":"ann","n":1}',
        "traceparent": TRACEPARENT,
    }


@pytest.mark.anyio
async def test_submit_writes_the_messages_parameters_as_json(
    client: Client, rclient: redis.Redis
) -> None:
    tools = [{"name": "lookup", "input_schema": {"type": "object"}}]
    await client.submit(
        "Find order 42",
        id="agent-1",
        tools=tools,
        tool_choice={"type": "tool", "name": "lookup"},
        stop_sequences=["END"],
        top_p=0.9,
        top_k=40,
        service_tier="auto",
        output_format='{"type": "json_schema", "schema": {"type": "object"}}',
        cache_control={"type": "ephemeral"},
        user_id="user-7",
        params={"inference_geo": "us"},
    )
    [(_, fields)] = entries(rclient, client.keys)
    assert {k: v for k, v in fields.items() if k not in ("prompt", "id", "model", "type")} == {
        "tools": '[{"name":"lookup","input_schema":{"type":"object"}}]',
        "tool_choice": '{"type":"tool","name":"lookup"}',
        "stop_sequences": '["END"]',
        "top_p": "0.9",
        "top_k": "40",
        "service_tier": "auto",
        "output_format": '{"type": "json_schema", "schema": {"type": "object"}}',  # as given
        "cache_control": '{"type":"ephemeral"}',
        "user_id": "user-7",
        "params": '{"inference_geo":"us"}',
    }
    with pytest.raises(InvalidTask, match=r"^tool_choice\.name: 'other' is not one of the tools"):
        await client.submit("x", tools=tools, tool_choice={"type": "tool", "name": "other"})
    await client.submit("y", id="agent-2", thinking={"type": "enabled", "budget_tokens": 1024},
                        max_tokens=2048)  # fmt: skip
    [_, (_, thinking)] = entries(rclient, client.keys)
    assert thinking["thinking"] == '{"type":"enabled","budget_tokens":1024}'
    with pytest.raises(InvalidTask, match=r"^top_k: must be left out with extended thinking"):
        await client.submit("z", thinking={"type": "adaptive"}, top_k=5)


@pytest.mark.anyio
async def test_a_client_without_arguments_is_configured_as_the_workers_are(
    fast_env: dict[str, str], rclient: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Client()` reads `REDIS_URL`, `PIPELINE_PREFIX` and the rest of `PIPELINE_*`."""
    for name, value in fast_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PIPELINE_INGRESS__MAX_PROMPT_BYTES", "50")
    async with Client() as client:
        assert client.keys.prefix == fast_env["PIPELINE_PREFIX"]
        task_id = await client.submit("hello", type="classify")
        with pytest.raises(InvalidTask, match="50"):
            await client.submit("x" * 51)
    assert [f["id"] for _, f in entries(rclient, Keys(fast_env["PIPELINE_PREFIX"]))] == [task_id]
    monkeypatch.setenv("PIPELINE_PREFIX", "bad prefix")
    with pytest.raises(ConfigError, match="prefix"):
        Client()


@pytest.mark.anyio
async def test_defaults_and_an_assigned_task_id(client: Client, rclient: redis.Redis) -> None:
    """Without an `id` the client gives the task one before sending (so it can be re-sent)."""
    task_id = await client.submit("hi")
    [(_, fields)] = entries(rclient, client.keys)
    assert re.fullmatch(r"[0-9a-f]{32}", task_id)
    assert fields == {"prompt": "hi", "model": "auto", "type": "default", "id": task_id}
    assert list(fields) == ["prompt", "model", "type", "id"]  # in WIRE_FIELDS order
    assert await client.submit("hi") != task_id  # a new task each call


@pytest.mark.anyio
async def test_messages_are_sent_as_json(client: Client, rclient: redis.Redis) -> None:
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "text", "text": "More é"}]},
    ]
    await client.submit(messages=turns)
    [(_, fields)] = entries(rclient, client.keys)
    assert json.loads(fields["messages"]) == turns
    assert "prompt" not in fields


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({}, "prompt or messages: missing"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "both given"),
        ({"prompt": "   "}, "prompt: is empty"),
        ({"prompt": 5}, "prompt: must be a string, not int"),
        ({"prompt": "a", "promt": "b"}, "unknown field 'promt'"),
        ({"prompt": "\ud800"}, "prompt: is not valid UTF-8 text"),
        ({"messages": []}, "messages: is empty"),
        ({"messages": "[oops"}, "messages: not valid JSON"),
        ({"messages": {"role": "user"}}, "messages: must be a string, not dict"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role: must be"),
        ({"messages": [{"role": "system", "content": "x"}]}, "put a system prompt in the 'system'"),
        ({"messages": [{"role": "user", "content": " "}]}, "messages[0].content: is empty"),
        ({"messages": [{"role": "user", "content": "x", "name": "ann"}]}, "unknown key 'name'"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "must be from 'user'"),
        ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "with a 'type'"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]},
         "content[0].text: must be a non-empty string"),
        ({"prompt": "a", "system": [{"type": "image"}]}, "system[0].type: must be 'text'"),
        ({"prompt": "a", "system": '[{"type":"image"}]'}, "system[0].type: must be 'text'"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens: must be a whole number from 1"),
        ({"prompt": "a", "max_tokens": "lots"}, "max_tokens: must be a whole number"),
        ({"prompt": "a", "max_tokens": True}, "max_tokens: must be a whole number"),
        ({"prompt": "a", "temperature": 1.5}, "temperature: must be a number from 0 to 1"),
        ({"prompt": "a", "temperature": float("nan")}, "temperature: must be a number"),
        ({"prompt": "a", "model": "claude sonnet"}, "model: must be auto, a family alias"),
        ({"prompt": "a", "type": "my type"}, "type: must be a short label"),
        ({"prompt": "a", "type": "t" * 65}, "type: must be a short label"),
        ({"prompt": "a", "id": "x" * 300}, "id: must be 1-256"),
        ({"prompt": "a", "cache": "maybe"}, "cache: must be true, false, 1 or 0"),
        ({"prompt": "a", "ttl": "-1"}, "ttl: must be whole seconds"),
        ({"prompt": "a", "ttl": 0}, "ttl: must be whole seconds"),
        ({"prompt": "a", "metadata": "[1]"}, "metadata: must be a JSON object"),
        ({"prompt": "a", "metadata": [1]}, "metadata: must be a string, not list"),
        ({"prompt": "a", "metadata": {"x": object()}}, "metadata: cannot be encoded as JSON"),
        ({"prompt": "a", "traceparent": "abc"}, "traceparent: is not a W3C traceparent"),
        ({"prompt": "a", "tracestate": "k=" + "v" * 600}, "tracestate: 602 bytes, over the"),
    ],
)  # fmt: skip
def test_validation_says_what_is_wrong(task: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidTask) as caught:
        task_fields(task)
    assert message in str(caught.value)


def test_sizes_are_bounded_by_ingress_settings() -> None:
    limits = Settings(ingress=IngressSettings(max_prompt_bytes=10, max_metadata_bytes=10))
    with pytest.raises(InvalidTask, match=r"prompt: 11 bytes, over the 10-byte limit \(ingress"):
        task_fields({"prompt": "x" * 11}, limits)
    with pytest.raises(InvalidTask, match="prompt \\+ system: 12 bytes"):
        task_fields({"prompt": "x" * 6, "system": "s" * 6}, limits)
    with pytest.raises(InvalidTask, match="metadata: 13 bytes"):
        task_fields({"prompt": "x", "metadata": {"k": "vvvvv"}}, limits)
    assert task_fields({"prompt": "é" * 5}, limits)  # 10 bytes: at the limit is fine


def test_the_client_checks_with_its_own_settings(settings: Settings) -> None:
    """Client(url, prefix) validates with Settings() defaults; from_settings with its settings."""
    small = msgspec.structs.replace(settings, ingress=IngressSettings(max_prompt_bytes=10))
    plain = Client(settings.redis.url, settings.prefix, ingress=small.ingress)
    assert plain.settings.prefix == settings.prefix
    assert plain.settings.redis.url == settings.redis.url
    assert plain.settings.ingress.max_prompt_bytes == 10 == plain.limits.max_prompt_bytes
    assert Client.from_settings(small).settings == small


def test_wire_forms_validate_like_python_values(settings: Settings) -> None:
    """A JSONL copy of an XADD (all strings) means the same request as Python values."""
    as_strings = task_fields(
        {"prompt": "a", "max_tokens": "10", "temperature": "0.2", "cache": "false", "ttl": "60",
         "metadata": '{"k": 1}', "system": "", "messages": None}
    )  # fmt: skip
    as_values = task_fields(
        {"prompt": "a", "max_tokens": 10, "temperature": 0.2, "cache": False, "ttl": 60,
         "metadata": {"k": 1}}
    )  # fmt: skip
    assert as_values["metadata"] == '{"k":1}'
    assert {k: v for k, v in as_strings.items() if k != "metadata"} == {
        k: v for k, v in as_values.items() if k != "metadata"
    }
    parsed = [parse_request(f, settings) for f in (as_strings, as_values)]
    assert parsed[0].request_hash == parsed[1].request_hash


#: Tasks both the client and the cache-check stage must accept, and wire entries both refuse.
ACCEPTED: list[dict[str, object]] = [
    {"prompt": "hi"},
    {"prompt": "hi", "type": "Summarise", "model": "HAIKU", "cache": "0", "ttl": "5"},
    {"prompt": "hi", "model": "claude-sonnet-4-5@2025", "max_tokens": 1_000_000},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"},
                                               {"type": "image", "source": {}}]},
                  {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}]},
    {"prompt": "hi", "system": [{"type": "text", "text": "be brief",
                                 "cache_control": {"type": "ephemeral"}}]},
    {"prompt": "hi", "temperature": 0, "metadata": {"a": [1, 2]}, "system": "[not json"},
    {"prompt": "hi", "system": "[1, 2] is a list"},
]  # fmt: skip
REJECTED: list[dict[str, str]] = [
    {},
    {"prompt": " "},
    {"prompt": "a", "messages": '[{"role":"user","content":"b"}]'},
    {"messages": "[]"},
    {"messages": '[{"role":"assistant","content":"b"}]'},
    {"messages": '[{"role":"user","content":"b","x":1}]'},
    {"messages": '[{"role":"user","content":[{"type":"text","text":" "}]}]'},
    {"prompt": "a", "system": '[{"type":"image"}]'},  # once let through by the client
    {"prompt": "a", "system": '[{"type":"text","text":"x","extra":1}]'},
    {"prompt": "a", "type": "a b"},
    {"prompt": "a", "type": "-leading"},
    {"prompt": "a", "model": "m" * 129},
    {"prompt": "a", "max_tokens": "1000001"},
    {"prompt": "a", "max_tokens": "1.5"},
    {"prompt": "a", "temperature": "nan"},
    {"prompt": "a", "cache": "yes"},
    {"prompt": "a", "ttl": str(30 * 24 * 3600 + 1)},
    {"prompt": "a", "metadata": "[]"},
    {"prompt": "x" * (1024 * 1024 - 3), "system": "four"},
]


def test_the_client_and_the_cache_check_stage_agree(settings: Settings) -> None:
    """One set of rules: the client refuses with the very message the stage dead-letters with,
    and what it lets through is what the stage accepts."""
    for task in ACCEPTED:
        parse_request(task_fields(task, settings), settings)
    for fields in REJECTED:
        with pytest.raises(InvalidTask) as by_client:
            task_fields(fields, settings)
        with pytest.raises(InvalidTask) as by_stage:
            parse_request(fields, settings)
        assert str(by_client.value) == str(by_stage.value)


@pytest.mark.anyio
async def test_invalid_submit_writes_nothing(client: Client, rclient: redis.Redis) -> None:
    with pytest.raises(InvalidTask, match="temperature"):
        await client.submit("a", temperature=-1)
    assert rclient.xlen(client.keys.ingress) == 0


# ---- backpressure -----------------------------------------------------------------------------


@pytest.fixture
def small(fast_env: dict[str, str]) -> Settings:
    return load_settings(env={**fast_env, "PIPELINE_INGRESS__MAX_BACKLOG": "3"})


@pytest.mark.anyio
async def test_backpressure_when_the_ingress_is_full(small: Settings, rclient: redis.Redis) -> None:
    keys = Keys(small.prefix)
    async with Client.from_settings(small) as client:
        for n in range(3):
            await client.submit(f"task {n}")
        with pytest.raises(Backpressure, match=r"holds 3 tasks.*ingress.max_backlog \(3\)"):
            await client.submit("one too many")
        assert rclient.xlen(keys.ingress) == 3
        # A drained ingress is seen at once: the client measures again before refusing.
        rclient.xtrim(keys.ingress, maxlen=0)
        await client.submit("room again")
        assert rclient.xlen(keys.ingress) == 1


@pytest.mark.anyio
async def test_backpressure_counts_other_producers(small: Settings, rclient: redis.Redis) -> None:
    keys = Keys(small.prefix)
    for n in range(3):
        rclient.xadd(keys.ingress, {"prompt": f"from elsewhere {n}"})
    async with Client.from_settings(small) as client:
        with pytest.raises(Backpressure):
            await client.submit("mine")


@pytest.mark.anyio
async def test_submit_many_is_all_or_nothing(small: Settings, rclient: redis.Redis) -> None:
    keys = Keys(small.prefix)
    async with Client.from_settings(small) as client:
        with pytest.raises(Backpressure):
            await client.submit_many([{"prompt": str(n)} for n in range(4)])
        assert rclient.xlen(keys.ingress) == 0
        with pytest.raises(InvalidTask, match=r"task 1: prompt: is empty"):
            await client.submit_many([{"prompt": "fine"}, {"prompt": ""}])
        assert rclient.xlen(keys.ingress) == 0
        assert len(await client.submit_many([{"prompt": str(n)} for n in range(3)])) == 3


# ---- submit_many ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_submit_many_puts_10000_tasks_in_quickly(
    client: Client, rclient: redis.Redis
) -> None:
    tasks = [
        {"prompt": f"task {n}", "type": "classify", **({"id": f"own-{n}"} if n % 2 else {})}
        for n in range(10_000)
    ]
    started = time.perf_counter()
    ids = await client.submit_many(tasks)
    took = time.perf_counter() - started
    assert took < 5.0, f"10,000 tasks took {took:.2f}s: not batched?"
    stored = entries(rclient, client.keys)
    assert len(stored) == len(ids) == len(set(ids)) == 10_000
    for n, (task_id, (_, fields)) in enumerate(zip(ids, stored, strict=True)):
        assert task_id == fields["id"]
        assert (task_id == f"own-{n}") if n % 2 else re.fullmatch(r"[0-9a-f]{32}", task_id)
        assert fields["prompt"] == f"task {n}"
    assert BATCH_SIZE == 500
    assert await client.submit_many([]) == []


# ---- all or nothing, and safe to send again --------------------------------------------------


@pytest.mark.anyio
async def test_a_batch_redis_refuses_part_way_adds_nothing(
    private_redis: RedisServer, prefix: str
) -> None:
    """`maxmemory` (noeviction) runs out part way through a batch: no task of it is added,
    the error says so, and the same batch (same ids) goes in whole once there is room."""
    direct = redis.Redis.from_url(private_redis.url)
    keys = Keys(prefix)
    tasks = [{"prompt": f"task {n} " + "x" * 1000, **({"id": f"own-{n}"} if n % 3 else {})}
             for n in range(2000)]  # fmt: skip
    try:
        async with Client(private_redis.url, prefix) as client:
            await client.backlog()  # the client's connection exists before the limit is set
            used = int(direct.info("memory")["used_memory"])
            direct.config_set("maxmemory-policy", "noeviction")
            direct.config_set("maxmemory", used + 512 * 1024)  # room for a few hundred of them
            with pytest.raises(RedisUnavailable) as caught:
                await client.submit_many(tasks)
            landed = direct.xlen(keys.ingress)
            assert landed == 0, f"{landed} of {len(tasks)} tasks of a refused batch were added"
            failed = caught.value
            assert isinstance(failed, SubmitFailed)
            assert "refused the batch (OutOfMemoryError" in str(failed)
            assert "maxmemory" in str(failed)
            assert "none of its 2,000 task(s) was added" in str(failed)
            assert failed.maybe_added is False
            assert len(failed.ids) == len(set(failed.ids)) == len(tasks)
            assert failed.ids[1] == "own-1" and re.fullmatch(r"[0-9a-f]{32}", failed.ids[0])

            direct.config_set("maxmemory", 0)
            assert await client.submit_many(failed.tasks) == failed.ids
            stored = entries(direct, keys)
            assert [f["id"] for _, f in stored] == failed.ids
            assert [f["prompt"] for _, f in stored] == [t["prompt"] for t in tasks]
    finally:
        direct.close()


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[CutProxy]:
    cut = await CutProxy(redis_url).start()
    yield cut
    await cut.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["after-exec", "before-exec"])
async def test_a_lost_connection_names_the_batch_to_send_again(
    proxy: CutProxy, settings: Settings, rclient: redis.Redis, how: Cut
) -> None:
    """The connection dies with the batch in flight, after or before Redis ran it; the
    caller cannot tell which. The error carries the batch with its ids; sending it again
    puts each task in under the same id with the same request (the pipeline drops the copy
    of one that was in: tests/e2e/test_submit_retry.py)."""
    keys = Keys(settings.prefix)
    tasks = [{"prompt": f"task {n}", **({"id": f"own-{n}"} if n % 2 else {})}
             for n in range(50)]  # fmt: skip
    async with Client(proxy.url, settings.prefix) as client:
        await client.backlog()
        proxy.cut(how)
        with pytest.raises(RedisUnavailable) as caught:
            await client.submit_many(tasks)
        assert proxy.cuts == 1
        failed = caught.value
        assert isinstance(failed, SubmitFailed), repr(failed)
        assert failed.maybe_added is True
        assert "all or none of them were added: send exc.tasks again" in str(failed)
        first = entries(rclient, keys)
        assert len(first) == (50 if how == "after-exec" else 0)  # whole, or not at all
        assert [f["id"] for _, f in first] == (failed.ids if first else [])
        assert [f["id"] for f in failed.tasks] == failed.ids
        assert failed.ids[1::2] == [f"own-{n}" for n in range(1, 50, 2)]

        assert await client.submit_many(failed.tasks) == failed.ids
    stored = entries(rclient, keys)
    assert len(stored) == len(first) + 50
    assert [fields for _, fields in stored[len(first) :]] == failed.tasks
    assert all(f == again for (_, f), (_, again) in zip(first, stored[50:], strict=False))


@pytest.mark.anyio
async def test_submit_can_be_sent_again_under_its_id(
    proxy: CutProxy, settings: Settings, rclient: redis.Redis
) -> None:
    async with Client(proxy.url, settings.prefix) as client:
        await client.backlog()
        proxy.cut("after-exec")
        with pytest.raises(SubmitFailed) as caught:
            await client.submit("Name a colour.", type="classify")
        [task_id] = caught.value.ids
        assert await client.submit("Name a colour.", type="classify", id=task_id) == task_id
    stored = [fields for _, fields in entries(rclient, Keys(settings.prefix))]
    assert stored == [{"prompt": "Name a colour.", "model": "auto", "type": "classify",
                       "id": task_id}] * 2  # fmt: skip


# ---- results ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_result_reads_the_hash(client: Client, rclient: redis.Redis) -> None:
    assert await client.result("nope") is None
    complete(rclient, client.keys, "t1", output="forty-two")
    found = await client.result("t1")
    assert found is not None
    assert found["status"] == "completed"
    assert found["output"] == "forty-two"


@pytest.mark.anyio
async def test_wait_resolves_when_the_result_arrives(client: Client, rclient: redis.Redis) -> None:
    waiter = asyncio.create_task(client.result("t2", wait=10))
    await until_waiting(client, 1)
    started = time.perf_counter()
    complete(rclient, client.keys, "t2", output="done")
    found = await waiter
    assert found is not None and found["output"] == "done"
    assert time.perf_counter() - started < 1.0
    assert client.waiting == 0


@pytest.mark.anyio
async def test_wait_finds_a_result_that_is_already_there(
    client: Client, rclient: redis.Redis
) -> None:
    complete(rclient, client.keys, "t3")
    started = time.perf_counter()
    assert await client.result("t3", wait=10) is not None
    assert time.perf_counter() - started < 1.0


@pytest.mark.anyio
async def test_wait_times_out_with_none(client: Client) -> None:
    started = time.perf_counter()
    assert await client.result("never", wait=0.3) is None
    assert 0.25 < time.perf_counter() - started < 2.0
    assert client.waiting == 0


@pytest.mark.anyio
async def test_a_result_without_its_event_is_found_at_the_deadline(
    client: Client, rclient: redis.Redis
) -> None:
    """A trimmed-away event must not turn into a missed result."""
    waiter = asyncio.create_task(client.result("quiet", wait=0.5))
    await until_waiting(client, 1)
    rclient.hset(client.keys.result("quiet"), mapping=make_result("completed"))
    assert await waiter is not None


@pytest.mark.anyio
async def test_2000_waiters_share_two_connections(settings: Settings, rclient: redis.Redis) -> None:
    keys = Keys(settings.prefix)
    async with Client.from_settings(settings, name=f"{settings.prefix}-waiters") as client:
        ids = [f"w{n}" for n in range(2000)]
        complete(rclient, keys, ids[0])  # one is already there before anyone waits
        waiters = [asyncio.create_task(client.result(i, wait=30)) for i in ids]
        await until_waiting(client, 1999)
        assert client.waiting == 1999
        assert named_connections(rclient, client.name) <= 2
        started = time.perf_counter()
        pipe = rclient.pipeline(transaction=False)
        for n, task_id in enumerate(ids[1:], 1):
            pipe.hset(keys.result(task_id), mapping=make_result("completed", output=str(n)))
            pipe.xadd(keys.done, {"id": task_id, "status": "completed"})
        pipe.execute()
        results = await asyncio.gather(*waiters)
        assert time.perf_counter() - started < 5.0
        assert [r["output"] if r else None for r in results[1:]] == [str(n) for n in range(1, 2000)]
        assert named_connections(rclient, client.name) <= 2
    for _ in range(200):  # the server sees a closed socket a moment after the client closed it
        if named_connections(rclient, client.name) == 0:
            break
        await asyncio.sleep(0.01)
    assert named_connections(rclient, client.name) == 0


@pytest.mark.anyio
async def test_unreachable_redis_is_one_clear_error() -> None:
    port = free_port()
    async with Client(f"redis://reader:hunter2@127.0.0.1:{port}/0", "x") as client:
        with pytest.raises(RedisUnavailable) as caught:
            await client.submit("hi")
        message = str(caught.value)
        assert message.startswith(f"cannot reach Redis at redis://reader:***@127.0.0.1:{port}/0")
        assert "hunter2" not in message
        with pytest.raises(RedisUnavailable):
            await client.result("x", wait=1)
