"""The batch lane through all four stages and the fake's Message Batches API: answers at half
price, each request in exactly one batch, each task answered once, through worker kills."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline import Services, Settings, load_settings
from pipeline.claude import BatchLane, TaskRecords, batch_api
from pipeline.claude.api import make_client
from pipeline.claude.batch_lane import poll_interval_s
from pipeline.claude.pricing import DEFAULT_PRICES
from pipeline.claude.task import Usage
from pipeline.fake_claude import FakeClaudeConfig, FakeClaudeServer, run_fake_claude_in_thread
from pipeline.runtime.keys import Keys
from pipeline.runtime.status import gather_status
from stages import app as stages_app
from tests.helpers.outcomes import tally
from tests.helpers.workers import Workers, wait_until

pytestmark = pytest.mark.chaos


@pytest.fixture
def fake() -> Iterator[FakeClaudeServer]:
    config = FakeClaudeConfig(latency_ms=20, batch_processing_s=1.0, seed=13)
    with run_fake_claude_in_thread(config) as server:
        yield server


@pytest.fixture
def workers(fast_env: dict[str, str], fake: FakeClaudeServer, tmp_path: Path) -> Iterator[Workers]:
    env = {
        **fast_env,
        "ANTHROPIC_BASE_URL": fake.base_url,
        "ANTHROPIC_API_KEY": "good-key",
        "PIPELINE_BATCH__MAX_WAIT_S": "0.5",
        "PIPELINE_BATCH__POLL_S": "0.2",
        "PIPELINE_BATCH__MAX_REQUESTS": "400",
        "PIPELINE_BATCH__LEADER_TTL_S": "2",
        "PIPELINE_CLAUDE__TIMEOUT_S": "3",  # how long a lost create may still land
    }
    w = Workers(env, tmp_path, app="stages:app")
    yield w
    w.stop_all()


def submit(client: redis.Redis, prefix: str, n: int, tag: str = "t", **fields: str) -> list[str]:
    ids = [f"{tag}{i}" for i in range(n)]
    pipe = client.pipeline(transaction=False)
    for i, task_id in enumerate(ids):
        pipe.xadd(Keys(prefix).ingress, {"id": task_id, "model": "haiku", "max_tokens": "200",
                                         "prompt": f"{tag} nightly job {i}", **fields})  # fmt: skip
    pipe.execute()
    return ids


def results(client: redis.Redis, prefix: str, ids: list[str]) -> dict[str, dict[str, str]]:
    keys = Keys(prefix)
    out = {}
    for task_id in ids:
        raw = client.hgetall(keys.result(task_id))
        out[task_id] = {k.decode(): v.decode() for k, v in raw.items()}
    return out


def wait_results(client: redis.Redis, prefix: str, ids: list[str], timeout: float = 90) -> None:
    keys = Keys(prefix)
    wait_until(lambda: all(client.exists(keys.result(i)) for i in ids), timeout,
               what=f"{len(ids)} results")  # fmt: skip


def test_batched_tasks_are_answered_at_half_price_each_in_one_batch(
    workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    workers.start(args=["-n", "50"])
    ids = submit(rclient, prefix, 1000, batch="true")
    standard = submit(rclient, prefix, 20, tag="now")
    wait_results(rclient, prefix, ids + standard)
    t = tally(rclient, prefix)
    t.assert_exactly_once(ids + standard)
    found = results(rclient, prefix, ids)
    assert all(r["status"] == "completed" for r in found.values())
    batch = fake.batch_stats()
    assert batch["created"] >= 3, "1,000 tasks at 400 a batch"
    assert sorted(batch["requests_by_custom_id"].values()) == [1] * 1000
    assert batch["duplicate_custom_ids"] == 0
    # None of them was called at full price; the standard tasks were.
    assert fake.stats()["succeeded"] == len(standard)
    for task_id, result in found.items():
        usage = json.loads(result["usage"])
        assert usage["service_tier"] == "batch", task_id
        tokens = Usage(input_tokens=usage["input_tokens"], output_tokens=usage["output_tokens"])
        half = DEFAULT_PRICES.cost_micro_usd("claude-haiku-5-5", tokens) / 2
        assert abs(float(result["cost_usd"]) * 1e6 - half) <= 1, (task_id, result["cost_usd"])
    assert batch["usage"]["output_tokens"] == sum(int(r["output_tokens"]) for r in found.values())
    keys = Keys(prefix)
    assert not rclient.exists(keys.batch_shelf("haiku")), "every task left the shelf"
    assert not rclient.exists(keys.batches("haiku")), "every batch was forgotten"
    # The ledger prices them at batch rates and shows what that saved, on a line of its own.
    env = {**os.environ, **workers.env, "COLUMNS": "100"}
    command = [sys.executable, "-m", "pipeline.cli", "cost"]
    report = json.loads(subprocess.run([*command, "--json"], env=env, capture_output=True,
                                       text=True, timeout=60, check=True).stdout)  # fmt: skip
    total = report["total"]
    spent_batched = sum(float(r["cost_usd"]) for r in found.values())
    assert abs(total["batch_saved_usd"] - spent_batched) < 0.0001 * len(found)
    assert total["requests"] == len(ids) + len(standard)
    table = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60).stdout
    assert "batch saved" in table
    # Batched answers landed in the response cache, as plain calls' do (complete ones).
    complete = [int(t[1:]) for t, r in found.items() if r["stop_reason"] == "end_turn"][:5]
    assert complete
    for i in complete:
        rclient.xadd(keys.ingress, {"id": f"again{i}", "model": "haiku", "max_tokens": "200",
                                    "prompt": f"t nightly job {i}"})  # fmt: skip
    wait_results(rclient, prefix, [f"again{i}" for i in complete])
    for i in complete:
        hit = results(rclient, prefix, [f"again{i}"])[f"again{i}"]
        assert hit["cached"] == "true" and hit["output"] == found[f"t{i}"]["output"], hit
    assert fake.stats()["succeeded"] == len(standard), "no new call"


def test_a_task_with_a_short_deadline_never_waits_in_a_batch(
    workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    workers.start()
    ids = submit(rclient, prefix, 10, batch="true", deadline="600")
    wait_results(rclient, prefix, ids)
    assert fake.batch_stats()["created"] == 0
    assert fake.stats()["succeeded"] == 10


def test_errored_and_expired_requests_are_answered_on_the_standard_lane(
    workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    fake.update_config(batch_error_rate=0.1, batch_expire_rate=0.1)
    # A budget, so that each path's reservation is seen through: settled at batch rates when
    # the batch answers, given back when the task leaves for the standard lane (which
    # reserves again, at list prices).
    workers.start(args=["-n", "50"], extra_env={"PIPELINE_BUDGET__DAILY_USD": "1000"})
    ids = submit(rclient, prefix, 300, batch="true")
    wait_results(rclient, prefix, ids)
    t = tally(rclient, prefix)
    t.assert_exactly_once(ids)
    found = results(rclient, prefix, ids)
    assert all(r["status"] == "completed" for r in found.values())
    batch = fake.batch_stats()
    missed = batch["results"].get("errored", 0) + batch["results"].get("expired", 0)
    assert missed > 0
    assert fake.stats()["succeeded"] == missed, "each missed request called once, at full price"
    tiers = [json.loads(r["usage"])["service_tier"] for r in found.values()]
    assert tiers.count("standard") == missed and tiers.count("batch") == 300 - missed
    window = {k.decode(): int(v) for k, v in rclient.hgetall(budget_key(prefix)).items()}
    assert window["committed"] == window["spent"], "no reservation left behind"
    spent = sum(round(float(r["cost_usd"]) * 1e6) for r in found.values())
    assert abs(window["spent"] - spent) <= len(found), (window, spent)


def budget_key(prefix: str) -> str:
    return Keys(prefix).budget(time.strftime("%Y-%m-%d", time.gmtime()))


def test_batched_spend_counts_against_the_budget(
    workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    """A budget holds for batched tasks too: what does not fit is not sent in a batch."""
    budget = {"PIPELINE_BUDGET__DAILY_USD": "0.01", "PIPELINE_BUDGET__ACTION": "fail"}
    workers.start(args=["-n", "50"], extra_env=budget)
    ids = submit(rclient, prefix, 40, batch="true")
    wait_results(rclient, prefix, ids)
    found = results(rclient, prefix, ids)
    answered = [r for r in found.values() if r["status"] == "completed"]
    refused = [r for r in found.values() if r["status"] == "failed"]
    # Each haiku request may cost up to ~$0.0005 at batch rates (200 tokens out): about 20 fit.
    assert 5 < len(answered) < 40 and len(answered) + len(refused) == 40
    assert all("daily budget" in r["error"] for r in refused), refused[:1]
    requests = sum(fake.batch_stats()["requests_by_custom_id"].values())
    assert requests == len(answered), "nothing over budget was sent"
    window = {k.decode(): int(v) for k, v in rclient.hgetall(budget_key(prefix)).items()}
    assert window["committed"] == window["spent"] <= 10_000
    assert window["spent"] == sum(round(float(r["cost_usd"]) * 1e6) for r in answered)


def test_killing_the_batcher_with_batches_open_loses_nothing_and_sends_nothing_twice(
    workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    fake.update_config(batch_processing_s=4.0)
    first = workers.start(args=["-n", "50"])
    ids = submit(rclient, prefix, 800, batch="true")
    keys = Keys(prefix)
    wait_until(lambda: fake.batch_stats()["created"] >= 1, 30, what="a batch sent")
    first.signal(signal.SIGKILL)
    first.wait(10)
    workers.start(args=["-n", "50"])
    wait_results(rclient, prefix, ids, timeout=120)
    t = tally(rclient, prefix)
    t.assert_exactly_once(ids)
    batch = fake.batch_stats()
    assert sorted(batch["requests_by_custom_id"].values()) == [1] * 800
    assert fake.stats()["succeeded"] == 0, "no task was called outside its batch"
    assert not rclient.exists(keys.batch_shelf("haiku"))


# ---- each kill point of the batcher, stopped exactly there -------------------------------
#
# Real workers shelve the tasks (a lane that never forms a batch on its own); the batcher's
# steps are then taken in this process up to the point where a process dies, the process
# "dies" (its lane is dropped, nothing after that point runs), and a real worker with the
# normal settings finishes. Afterwards: each request in exactly one batch, each task one
# result, none called outside its batch.


def shelve_only(workers: Workers, rclient: redis.Redis, prefix: str, n: int) -> list[str]:
    shelving = workers.start(extra_env={"PIPELINE_BATCH__MAX_WAIT_S": "100000",
                                        "PIPELINE_BATCH__MAX_REQUESTS": "100000"})  # fmt: skip
    ids = submit(rclient, prefix, n, batch="true")
    queue = Keys(prefix).batch_queue("haiku")
    wait_until(lambda: rclient.zcard(queue) == n, 60, what=f"{n} tasks shelved")
    shelving.signal(signal.SIGTERM)
    assert shelving.wait(30) == 0
    rclient.delete(Keys(prefix).batch_leader("haiku"))  # its lease lapses: this test leads
    return ids


def lane_in_this_process(
    fast_env: dict[str, str], fake: FakeClaudeServer, aredis: Any
) -> tuple[BatchLane, Services[Settings]]:
    settings = lane_settings(fast_env, fake)
    services = Services(settings, aredis, Keys(settings.prefix))
    records = TaskRecords.for_stage(services, "claude-batch")
    lane = BatchLane(
        services, "claude-batch", records,
        client=lambda: make_client(settings.claude, 4, api_key="good-key"),
        stage_stream=lambda family: services.keys.stream("call", family),
    )  # fmt: skip
    services.on_close(lane.aclose)
    return lane, services


def finished_once(workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str,
                  ids: list[str]) -> None:  # fmt: skip
    workers.start()
    wait_results(rclient, prefix, ids)
    t = tally(rclient, prefix)
    t.assert_exactly_once(ids)
    assert all(r["status"] == "completed" for r in results(rclient, prefix, ids).values())
    batch = fake.batch_stats()
    assert batch["created"] == 1, "one batch, never sent twice"
    assert sorted(batch["requests_by_custom_id"].values()) == [1] * len(ids)
    assert fake.stats()["succeeded"] == 0, "no task called outside its batch"
    assert not rclient.exists(Keys(prefix).batch_shelf("haiku"))


@pytest.mark.anyio
async def test_a_batcher_killed_after_forming_before_create(
    workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str,
    fast_env: dict[str, str], aredis: Any,
) -> None:  # fmt: skip
    ids = shelve_only(workers, rclient, prefix, 120)
    lane, services = lane_in_this_process(fast_env, fake, aredis)
    assert await held(services) == ({"queued": 120, "in_batch": 0}, True)
    assert await lane.form("haiku") is not None  # ... and the process dies here
    assert await held(services) == ({"queued": 0, "in_batch": 120}, True)
    await services.aclose()
    finished_once(workers, fake, rclient, prefix, ids)
    assert await held(services) == ({"queued": 0, "in_batch": 0}, False)


async def held(services: Services[Settings]) -> tuple[dict[str, int], bool]:
    """What status and the held-task gauges read of the haiku lane: counts, and whether it
    has an oldest task."""
    status = await gather_status(services.redis, services.keys, stages_app(services.settings))
    (lane,) = [h for h in status.held if h.lane == "haiku"]
    assert lane.stage == "claude-batch"
    return lane.tasks, lane.oldest_s is not None


@pytest.mark.anyio
async def test_a_batcher_killed_between_create_and_recording_its_id(
    workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str,
    fast_env: dict[str, str], aredis: Any,
) -> None:  # fmt: skip
    ids = shelve_only(workers, rclient, prefix, 120)
    lane, services = lane_in_this_process(fast_env, fake, aredis)
    token = await lane.form("haiku")
    assert token is not None
    # What `send` does up to the create: the attempt is recorded, the batch is created ...
    await aredis.hset(Keys(prefix).batch(token), "attempted_ms", int(time.time() * 1000))
    client = make_client(lane_settings(fast_env, fake).claude, 4, api_key="good-key")
    await client.messages.batches.create(requests=await lane.requests(token, "haiku"))  # type: ignore[arg-type]
    await client.close()
    await services.aclose()  # ... and the process dies before recording its id
    assert not await aredis.hexists(Keys(prefix).batch(token), "id")
    finished_once(workers, fake, rclient, prefix, ids)


@pytest.mark.anyio
async def test_a_create_that_failed_before_reaching_the_api_is_sent_once(
    workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str,
    fast_env: dict[str, str], aredis: Any,
) -> None:  # fmt: skip
    ids = shelve_only(workers, rclient, prefix, 50)
    lane, services = lane_in_this_process(fast_env, fake, aredis)
    token = await lane.form("haiku")
    assert token is not None
    fake.update_config(bad_keys=frozenset({"good-key"}))  # the create is refused: none made
    with pytest.raises(batch_api.CreateRefused, match="401"):
        await lane.send(token)
    assert not await aredis.hexists(Keys(prefix).batch(token), "attempted_ms")
    fake.update_config(bad_keys=frozenset())
    await services.aclose()
    finished_once(workers, fake, rclient, prefix, ids)


@pytest.mark.anyio
async def test_a_batcher_killed_half_way_through_handing_answers_on(
    workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str,
    fast_env: dict[str, str], aredis: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    ids = shelve_only(workers, rclient, prefix, 600)
    fake.update_config(batch_processing_s=0.2)
    lane, services = lane_in_this_process(fast_env, fake, aredis)
    token = await lane.form("haiku")
    assert token is not None
    await lane.send(token)
    batch_id = (await aredis.hget(Keys(prefix).batch(token), "id")).decode()
    await asyncio.sleep(0.5)
    real = batch_api.results

    async def half(client: Any, batch: str, pause: float) -> AsyncIterator[Any]:
        n = 0
        async for line in real(client, batch, pause):
            if n == 300:
                raise KeyboardInterrupt("the process dies half way")
            n += 1
            yield line

    monkeypatch.setattr(batch_api, "results", half)
    await aredis.delete(Keys(prefix).batch_leader("haiku"))  # the shelving worker's lapsed
    with pytest.raises(KeyboardInterrupt):
        await lane.answer(token, batch_id, "haiku")
    monkeypatch.setattr(batch_api, "results", real)
    await services.aclose()
    handed = await aredis.xlen(Keys(prefix).stream("store"))
    assert 0 < handed < 600, handed
    finished_once(workers, fake, rclient, prefix, ids)


def lane_settings(fast_env: dict[str, str], fake: FakeClaudeServer) -> Settings:
    return load_settings(env={**fast_env, "PIPELINE_CLAUDE__BASE_URL": fake.base_url})


def test_a_batch_canceled_from_the_command_line_is_answered_on_the_standard_lane(
    workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    fake.update_config(batch_processing_s=600.0)
    workers.start(args=["-n", "50"])
    ids = submit(rclient, prefix, 40, batch="true")
    keys = Keys(prefix)
    wait_until(lambda: fake.batch_stats()["created"] == 1, 30, what="the batch sent")
    [token] = [t.decode() for t in rclient.smembers(keys.batches("haiku"))]
    wait_until(lambda: rclient.hexists(keys.batch(token), "id"), 10, what="its id recorded")
    batch_id = rclient.hget(keys.batch(token), "id").decode()
    env = {**os.environ, **workers.env, "COLUMNS": "120"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "pipeline.cli", "batches", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    listed = run("list")
    assert batch_id in listed.stdout, listed.stdout
    done = run("cancel", batch_id, "--yes")
    assert done.returncode == 0, done.stderr
    wait_results(rclient, prefix, ids)
    t = tally(rclient, prefix)
    t.assert_exactly_once(ids)
    assert fake.batch_stats()["results"].get("canceled", 0) == 40
    assert fake.stats()["succeeded"] == 40, "each canceled request answered at full price"


@pytest.mark.anyio
async def test_a_batch_larger_than_luas_unpack_limit_forms_in_one_step(
    fake: FakeClaudeServer, fast_env: dict[str, str], aredis: Any, prefix: str
) -> None:
    keys = Keys(prefix)
    ids = [f"big{i}" for i in range(9_000)]  # Lua's unpack stops near 8,000 values
    async with aredis.pipeline(transaction=False) as pipe:
        for i, task_id in enumerate(ids):
            pipe.zadd(keys.batch_queue("haiku"), {task_id: i})
            pipe.hset(keys.batch_shelf("haiku"), task_id, b"shelved")
        await pipe.execute()
    lane, services = lane_in_this_process(fast_env, fake, aredis)
    token = await lane.form("haiku")
    assert token is not None
    assert await aredis.hlen(keys.batch_members(token)) == 9_000
    assert await aredis.scard(keys.batch_unanswered(token)) == 9_000
    assert await aredis.zcard(keys.batch_queue("haiku")) == 0
    await services.aclose()


@pytest.mark.anyio
async def test_results_read_again_never_answer_a_task_the_batch_no_longer_holds(
    workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str,
    fast_env: dict[str, str], aredis: Any,
) -> None:  # fmt: skip
    """t0 left this batch (answered, its id reused and shelved again for a later batch): this
    batch's results, read again after a crash, must not answer the new t0 with the old one."""
    shelve_only(workers, rclient, prefix, 20)
    fake.update_config(batch_processing_s=0.2)
    lane, services = lane_in_this_process(fast_env, fake, aredis)
    token = await lane.form("haiku")
    assert token is not None
    await lane.send(token)
    batch_id = (await aredis.hget(Keys(prefix).batch(token), "id")).decode()
    await asyncio.sleep(0.5)
    keys = Keys(prefix)
    await aredis.srem(keys.batch_unanswered(token), "t0")  # the shelf still holds a t0
    await lane.answer(token, batch_id, "haiku")
    await services.aclose()
    assert await aredis.hexists(keys.batch_shelf("haiku"), "t0"), "the new t0 left alone"
    assert not await aredis.hexists(keys.task("t0"), "answer"), "nothing recorded onto it"
    assert await aredis.xlen(keys.stream("store")) == 19


def test_an_open_batch_is_polled_less_often_as_it_ages() -> None:
    settings = load_settings(
        env={"PIPELINE_BATCH__POLL_S": "30", "PIPELINE_BATCH__POLL_MAX_S": "300"}
    )
    assert poll_interval_s(settings, 0) == 30
    assert poll_interval_s(settings, 600) == 30
    assert poll_interval_s(settings, 3600) == 180
    assert poll_interval_s(settings, 86_400) == 300
