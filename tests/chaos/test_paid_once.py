"""The "Paid work is done once" and "Shutdown is clean" guarantees: paid work is done once, each
task gets its own answer, shutdown is clean.

Each test drives real worker subprocesses on a real Redis, the real stages against the fake
Anthropic API (or a toy App for the runtime alone), and counts what was paid at the fake:
  - an id submitted twice makes one call, one result; with another request the second entry
    is refused and the first answer kept (DESIGN "Wire format": `id` is an idempotency key);
  - a worker stalled between deciding and committing a hand-off does not hand it on again
    after another worker reclaimed it;
  - SIGTERM finishes a Claude call already sent instead of abandoning it, and a hand-back at
    shutdown does not count as a delivery;
  - an id reused after its result expired is answered for its own request, paid and counted;
  - coalescing never shares an answer across a budget downgrade;
  - a request identical to one that just landed is not paid again;
  - no key but its stream entries holds a task's (large) request.
The stalled worker runs tests/apps_stall.py, a toy App that blocks its event loop between
a handler's return and the commit of its hand-off.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from redis.typing import EncodableT, FieldT

from pipeline.claude.settings import Settings
from pipeline.fake_claude import FakeClaudeServer
from pipeline.runtime.keys import Keys
from tests.conftest import StartFake
from tests.helpers.outcomes import assert_drained, tally
from tests.helpers.workers import Workers, wait_until

pytestmark = pytest.mark.chaos

CLAUDE_STREAMS = ("tasks", "route", "call:haiku", "call:sonnet", "call:opus", "store")
TOY_STREAMS = ("tasks", "work", "finish")
FRONT = ("cache-check", "router", "store")  # every real stage but claude-call
MODELS = Settings().claude.models


def text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def read_hash(client: redis.Redis, key: str | bytes) -> dict[str, str]:
    raw = cast("dict[bytes, bytes]", client.hgetall(key))
    return {text(k): text(v) for k, v in raw.items()}


def read_stream(client: redis.Redis, key: str) -> list[dict[str, str]]:
    raw = cast("list[tuple[bytes, dict[bytes, bytes]]]", client.xrange(key))
    return [{text(k): text(v) for k, v in fields.items()} for _id, fields in raw]


@dataclass(repr=False)
class Rig:
    """One test's workers, Redis and (for the real stages) fake Claude API."""

    client: redis.Redis
    keys: Keys
    workers: Workers
    fake: FakeClaudeServer | None = None

    def __repr__(self) -> str:
        return f"Rig({self.prefix})"

    @property
    def prefix(self) -> str:
        return self.keys.prefix

    def submit(self, *tasks: Mapping[str, str]) -> None:
        """XADD the tasks to the ingress back to back (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for fields in tasks:
            entry: dict[FieldT, EncodableT] = {k: v for k, v in fields.items()}
            pipe.xadd(self.keys.ingress, entry)
        pipe.execute()

    def result(self, task_id: str) -> dict[str, str]:
        return read_hash(self.client, self.keys.result(task_id))

    def completions(self) -> Counter[str]:
        """Completion events per task id (cheap: no result reads, unlike `tally`)."""
        return Counter(event["id"] for event in read_stream(self.client, self.keys.done))

    def dlq(self, task_id: str) -> list[dict[str, str]]:
        return [e for e in read_stream(self.client, self.keys.dlq) if e["task_id"] == task_id]

    def stats(self) -> dict[str, Any]:
        assert self.fake is not None
        return self.fake.stats()

    def calls(self) -> int:
        """Requests the fake API received: each one is paid (or was sent to be)."""
        return int(self.stats()["requests_total"])

    def ledger_requests(self) -> int:
        """Paid calls the cost ledger counted, over every day's hash."""
        days = self.client.scan_iter(match=self.keys.ledger("*"), count=1000)
        counters = [read_hash(self.client, day) for day in days]
        return sum(int(v) for c in counters for k, v in c.items() if k.endswith("|requests"))

    def drained(self, streams: tuple[str, ...] = CLAUDE_STREAMS) -> bool:
        try:
            assert_drained(self.client, self.prefix, streams)
        except (AssertionError, redis.ResponseError):
            return False
        return True

    def wait_settled(self, task_ids: Mapping[str, int], timeout: float = 30,
                     streams: tuple[str, ...] = CLAUDE_STREAMS) -> None:  # fmt: skip
        """Wait for each task's completion events (at least `n`) and every stream drained."""

        def settled() -> bool:
            done = self.completions()
            return all(done[t] >= n for t, n in task_ids.items()) and self.drained(streams)

        what = f"{len(task_ids)} tasks completed and streams drained"
        wait_until(settled, timeout, every=0.1, what=what)

    def wait_expired(self, task_id: str, timeout: float = 15) -> None:
        key = self.keys.result(task_id)
        wait_until(lambda: not self.client.exists(key), timeout, what=f"{key} to expire")

    def wait_result(self, task_id: str, timeout: float = 30) -> dict[str, str]:
        key = self.keys.result(task_id)
        wait_until(lambda: bool(self.client.exists(key)), timeout, what=key)
        return self.result(task_id)


RigFactory = Callable[..., Rig]


@pytest.fixture
def rig(
    fast_env: dict[str, str], start_fake: StartFake, rclient: redis.Redis, prefix: str,
    tmp_path: Path,
) -> Iterator[RigFactory]:  # fmt: skip
    """`rig(app=..., fake=FakeClaudeConfig fields or None, **env)`: workers not started yet."""
    made: list[Workers] = []

    def make(app: str = "stages:app", fake: Mapping[str, Any] | None = None, **env: str) -> Rig:
        server = None if fake is None else start_fake(**fake)
        full = {**fast_env, **env}
        if server is not None:
            full |= {
                "ANTHROPIC_BASE_URL": server.base_url,
                "ANTHROPIC_API_KEY": "good-key",
                # A prober that went away must not hold the next call up for long.
                "PIPELINE_RATELIMIT__PROBE_MS": "1000",
            }
        logdir = tmp_path / f"rig-{len(made)}"
        logdir.mkdir()
        workers = Workers(full, logdir, app=app)
        made.append(workers)
        return Rig(rclient, Keys(prefix), workers, server)

    yield make
    for workers in made:
        workers.stop_all()


def reply_tag(output: str) -> str:
    """The fake's answer starts `fake-claude:<first 12 hex of the request's key>`."""
    tag = output.split(" ", 1)[0]
    assert tag.startswith("fake-claude:"), f"not an answer of the fake: {output[:60]!r}"
    return tag.removeprefix("fake-claude:")


def holder(client: redis.Redis, stream: str, group: str) -> tuple[str, int] | None:
    """(consumer, times delivered) of the one pending entry of `group`, if any."""
    try:
        pending = cast("list[dict[str, Any]]", client.xpending_range(stream, group, "-", "+", 10))
    except redis.ResponseError:  # no group yet
        return None
    if not pending:
        return None
    assert len(pending) == 1, pending
    return text(pending[0]["consumer"]), int(pending[0]["times_delivered"])


# ---- 1. an id is an idempotency key ---------------------------------------------------------


@pytest.mark.parametrize("cache", ["true", "false"])
def test_same_id_twice_makes_one_call_and_one_result(rig: RigFactory, cache: str) -> None:
    r = rig(fake={"latency_ms": 300})
    r.workers.start()
    task = {"id": "dupA", "prompt": "Name a colour.", "cache": cache}
    r.submit(task, task)
    r.wait_settled({"dupA": 1})

    assert r.calls() == 1, f"{r.calls()} Claude calls for one task id submitted twice"
    tally(r.client, r.prefix).assert_exactly_once(["dupA"])
    assert r.result("dupA")["status"] == "completed"
    assert r.ledger_requests() == 1


def test_same_id_with_another_request_is_refused_and_the_first_answer_kept(
    rig: RigFactory,
) -> None:
    r = rig(fake={"latency_ms": 1500})
    r.workers.start()
    first = {"id": "dupB", "prompt": "What is the capital of France?"}
    r.submit(first)
    wait_until(lambda: r.stats()["inflight"] == 1, 20, what="the first dupB's call")
    r.submit({"id": "dupB", "prompt": "What is the capital of Japan?"})
    r.wait_settled({"dupB": 1})

    assert r.calls() == 1, f"{r.calls()} Claude calls for one live task id"
    assert r.completions()["dupB"] == 1
    refused = r.dlq("dupB")
    assert len(refused) == 1, f"the second dupB was not refused: {refused}"
    assert "already" in refused[0]["error"], refused[0]["error"]
    kept = r.result("dupB")
    assert kept["status"] == "completed", kept

    # The same request as the first dupB, under another id: the fake answers it the same.
    r.submit({**first, "id": "ref", "cache": "false"})
    r.wait_settled({"ref": 1})
    assert kept["output"] == r.result("ref")["output"], "dupB holds the second request's answer"
    assert r.result("dupB") == kept, "the first dupB's result was touched"


# ---- 2. a stalled worker's hand-off is fenced at commit time --------------------------------


def test_a_stalled_worker_does_not_hand_on_what_another_reclaimed(rig: RigFactory) -> None:
    r = rig(app="tests.apps_stall:app")
    r.workers.start(["ingest", "finish"])
    # Whichever worker reads the entry first decides its hand-off, then stalls before the
    # commit until the other one has reclaimed the entry (after a lease) and run it.
    pair = [r.workers.start(["work"], extra_env={"TEST_STALL_S": "30"}) for _ in range(2)]
    r.submit({"id": "stall-1", "n": "21"})
    runs = r.keys.app_key("runs:work")
    wait_until(lambda: int(r.client.hget(runs, "stall-1") or 0) >= 2, 30,
               what="the entry reclaimed and run again")  # fmt: skip
    for proc in pair:  # each commits (or drops) what it decided before it exits
        proc.signal(signal.SIGTERM)
    assert [proc.wait(20) for proc in pair] == [0, 0]
    r.wait_settled({"stall-1": 1}, streams=TOY_STREAMS)

    t = tally(r.client, r.prefix, ("work", "finish"))
    assert t.runs["finish"]["stall-1"] == 1, (
        f"finish received the task {t.runs['finish']['stall-1']} times"
    )
    t.assert_exactly_once(["stall-1"])
    assert r.result("stall-1")["output"] == "42"


# ---- 3. shutdown: a paid call is finished, a hand-back is not a delivery --------------------


def test_sigterm_finishes_a_claude_call_already_sent(rig: RigFactory) -> None:
    r = rig(fake={"latency_ms": 10_000}, PIPELINE_RUNTIME__GRACE_S="3")
    r.workers.start(FRONT)
    caller = r.workers.start(["claude-call"])
    r.submit({"id": "long-1", "prompt": "Write a long essay."})
    wait_until(lambda: r.stats()["inflight"] == 1, 20, what="the call in flight")
    caller.signal(signal.SIGTERM)
    assert caller.wait(30) == 0, caller.log()[-2000:]
    r.workers.start(["claude-call"])  # takes over whatever was handed back
    r.wait_settled({"long-1": 1})

    stats = r.stats()
    assert (stats["requests_total"], stats["client_gone"]) == (1, 0), (
        "the call in flight at SIGTERM was abandoned and paid again"
    )
    assert r.result("long-1")["status"] == "completed"


def test_hand_backs_at_shutdown_do_not_count_as_deliveries(rig: RigFactory) -> None:
    r = rig(app="tests.apps:app", PIPELINE_RUNTIME__MAX_DELIVERIES="3",
            PIPELINE_RUNTIME__GRACE_S="0.3")  # fmt: skip
    r.workers.start(["ingest", "finish"])
    r.submit({"id": "deploy-1", "n": "5"})
    work = r.keys.stream("work")
    for i in range(5):  # five deploys in a row, each SIGTERMing the worker mid-handler
        name = f"w{i}"
        proc = r.workers.start(["work"], extra_env={"TEST_SLOW_S": "60"}, args=["--consumer", name])

        def taken(name: str = name) -> bool:
            held = holder(r.client, work, "work")
            return (held is not None and held[0] == name) or r.client.xlen(r.keys.dlq) > 0

        wait_until(taken, 20, what=f"{name} to take the entry")
        dead = r.dlq("deploy-1")
        assert not dead, f"dead-lettered after {i} clean shutdowns: {dead[0]['error']}"
        held = holder(r.client, work, "work")
        assert held is not None and held[1] <= 2, (
            f"{held}: (consumer, times delivered) after {i} clean shutdowns"
        )
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    r.workers.start(["work"])  # a quick handler this time
    r.wait_settled({"deploy-1": 1}, streams=TOY_STREAMS)

    assert (r.result("deploy-1")["status"], r.result("deploy-1")["output"]) == ("completed", "10")
    tally(r.client, r.prefix).assert_exactly_once(["deploy-1"])


# ---- 4, 7. an id reused after its result expired is a new task ------------------------------


def test_a_reused_id_is_answered_for_its_own_request(rig: RigFactory) -> None:
    r = rig(fake={})
    r.workers.start()
    r.submit({"id": "q-1", "prompt": "What is the capital of France?", "ttl": "5"})
    r.wait_settled({"q-1": 1})
    france = r.result("q-1")
    r.wait_expired("q-1")
    r.submit({"id": "q-1", "prompt": "What is the capital of Japan?", "metadata": '{"n":2}'})
    japan = r.wait_result("q-1")

    answered = reply_tag(japan["output"])
    assert answered != reply_tag(france["output"]), "Japan got the France task's answer"
    assert json.loads(japan["metadata"]) == {"n": 2}
    assert r.calls() == 2
    assert answered in {key[:12] for key in r.stats()["calls_by_request"]}


def test_a_resubmitted_job_is_paid_and_counted_again(rig: RigFactory) -> None:
    r = rig(fake={})
    r.workers.start()
    job = {"id": "job-7", "prompt": "Summarise the water cycle.", "ttl": "3", "cache": "false"}
    r.submit(job)
    r.wait_settled({"job-7": 1})
    r.wait_expired("job-7")
    r.submit(job)
    r.wait_settled({"job-7": 2})

    assert (r.calls(), r.ledger_requests()) == (2, 2), "(paid calls, ledger requests)"


# ---- 5. coalescing stops at a budget downgrade ----------------------------------------------


def test_coalescing_never_crosses_a_budget_downgrade(rig: RigFactory, tmp_path: Path) -> None:
    # Sonnet's worst case at max_tokens 300 is ~$0.0045, Haiku's ~$0.0015: `tight` has no
    # room left for a Sonnet call and is downgraded; `roomy` has no budget.
    config = tmp_path / "budget.toml"
    config.write_text(
        '[budget]\naction = "downgrade"\ndowngrade_to = "haiku"\n[budget.types]\ntight = 0.003\n'
    )
    r = rig(fake={"latency_ms": 1500}, PIPELINE_CONFIG=str(config))
    r.workers.start(FRONT)
    r.workers.start(["claude-call"])
    same = {"prompt": "Explain recursion.", "model": "sonnet", "max_tokens": "300"}
    r.submit({**same, "id": "tight", "type": "tight"}, {**same, "id": "roomy", "type": "roomy"})
    r.wait_settled({"tight": 1, "roomy": 1})

    got = {t: (r.result(t)["model"], r.result(t)["cached"]) for t in ("tight", "roomy")}
    assert got == {"tight": (MODELS["haiku"], "false"), "roomy": (MODELS["sonnet"], "false")}
    assert r.calls() == 2


# ---- 6. a twin arriving just after an answer landed -----------------------------------------


def test_identical_requests_never_pay_twice_under_load(rig: RigFactory) -> None:
    r = rig(fake={"latency_ms": 300, "latency_sigma": 0.3, "latency_cap_ms": 500})
    r.workers.start(FRONT)
    for _ in range(2):  # 64 calls at a time: claude-call has a backlog, as under rate limits
        r.workers.start(["claude-call"], args=["--concurrency", "32"])
    prompts = [f"Question {i}: name a prime above {i * 7}." for i in range(400)]
    # Each twin 400 entries behind its first: it is past cache-check long before its first's
    # answer lands, and reaches claude-call after it landed.
    order = prompts + prompts[:100]
    ids = [f"load-{i}" for i in range(len(order))]
    r.submit(*({"id": t, "prompt": p} for t, p in zip(ids, order, strict=True)))
    r.wait_settled(dict.fromkeys(ids, 1), timeout=90)

    tally(r.client, r.prefix).assert_exactly_once(ids)
    calls = r.stats()["calls_by_request"]
    twice = {k: n for k, n in calls.items() if n > 1}
    assert not twice, f"{len(twice)} requests were paid more than once"
    assert len(calls) == 400


# ---- 8. nothing keeps the request beyond its stream entries -----------------------------------


def test_a_large_prompt_is_kept_in_no_key(rig: RigFactory) -> None:
    r = rig(fake={})
    r.workers.start()
    r.submit({"id": "big-1", "prompt": "Count the words. " + "lorem ipsum " * 5_000})
    r.wait_settled({"big-1": 1})
    assert r.result("big-1")["status"] == "completed"

    big = {}
    for key in r.client.scan_iter(match=r.keys.pattern(), count=1000):
        if r.client.type(key) != b"stream" and key.decode() != r.keys.result("big-1"):
            size = int(r.client.memory_usage(key) or 0)
            if size > 8 * 1024:
                big[key.decode()] = size
    assert not big, f"keys over 8 KB besides streams and the result: {big}"
