"""Response cache, routing rules and prompt-caching pass-through, end to end.

Real `pipeline worker --all` subprocesses (`stages:app`) against the fake Claude API: what the
API was asked is read from the fake's stats, what the producer got from the result hash.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline.fake_claude import FakeClaudeServer
from pipeline.runtime.keys import Keys
from tests.helpers.outcomes import tally
from tests.helpers.workers import Workers, wait_until

pytestmark = pytest.mark.chaos
StartFake = Callable[..., FakeClaudeServer]


class Run:
    """One worker (all four stages) against one fake API, and a way to submit and wait."""

    def __init__(self, rclient: redis.Redis, prefix: str, fake: FakeClaudeServer) -> None:
        self.rclient, self.keys, self.fake = rclient, Keys(prefix), fake
        self.ids: list[str] = []

    def task(self, task_id: str, **fields: str) -> dict[str, str]:
        """Submit a task and wait for its result."""
        self.rclient.xadd(self.keys.ingress, {"id": task_id, **fields})
        self.ids.append(task_id)
        key = self.keys.result(task_id)
        wait_until(lambda: self.rclient.exists(key), 30, what=f"the result of {task_id}")
        raw = self.rclient.hgetall(key)
        return {k.decode(): v.decode() for k, v in raw.items()}

    def calls(self) -> int:
        """Successful Messages calls the fake answered."""
        return int(self.fake.stats()["succeeded"])

    def cache_entries(self) -> list[bytes]:
        return list(self.rclient.scan_iter(match=self.keys.cache("*"), count=1000))

    def counters(self) -> dict[str, int]:
        raw = self.rclient.hgetall(self.keys.counters)
        return {k.decode(): int(v) for k, v in raw.items() if k.startswith(b"cache_")}

    def assert_each_once(self) -> None:
        tally(self.rclient, self.keys.prefix).assert_exactly_once(self.ids)


@pytest.fixture
def run_with(
    fast_env: dict[str, str],
    tmp_path: Path,
    rclient: redis.Redis,
    prefix: str,
    start_fake: StartFake,
) -> Any:
    """`run_with(toml="", **fake_config)`: a fake API, a config file, one worker running."""
    workers: list[Workers] = []

    def start(toml: str = "", **fake_config: Any) -> Run:
        fake = start_fake(**fake_config)
        config = tmp_path / "pipeline.toml"
        config.write_text(toml)
        env = {
            **fast_env,
            "ANTHROPIC_BASE_URL": fake.base_url,
            "ANTHROPIC_API_KEY": "test-key",
            "PIPELINE_CONFIG": str(config),
            "PIPELINE_RETRY__MAX_ATTEMPTS": "2",
        }
        w = Workers(env, tmp_path, app="stages:app")
        workers.append(w)
        w.start()
        return Run(rclient, prefix, fake)

    yield start
    for w in workers:
        w.stop_all()


# ---- the response cache ---------------------------------------------------------------------


def test_a_hit_makes_no_call_and_cache_false_neither_reads_nor_writes(run_with: Any) -> None:
    run = run_with()
    first = run.task("a1", prompt="Is this spam?", type="classify", metadata='{"n": 1}')
    assert (first["status"], first["cached"], first["stop_reason"]) == (
        "completed", "false", "end_turn"
    )  # fmt: skip
    assert run.calls() == 1 and len(run.cache_entries()) == 1

    hit = run.task("a2", prompt="Is this spam?", type="classify", metadata='{"n": 2}')
    assert (hit["status"], hit["cached"], hit["attempts"]) == ("completed", "true", "0")
    assert hit["output"] == first["output"] and hit["metadata"] == '{"n": 2}'
    assert float(hit["cost_usd"]) == 0
    assert run.calls() == 1, "a cache hit called the API"
    assert run.counters() == {"cache_misses": 1, "cache_hits": 1}

    bypass = run.task("a3", prompt="Is this spam?", type="classify", cache="false")
    assert bypass["cached"] == "false" and run.calls() == 2, "cache=false must not read"
    unwritten = run.task("b1", prompt="Is this ham?", type="classify", cache="false")
    assert unwritten["status"] == "completed" and len(run.cache_entries()) == 1
    assert run.counters() == {"cache_misses": 1, "cache_hits": 1}, "cache=false counts nothing"
    after = run.task("b2", prompt="Is this ham?", type="classify")
    assert after["cached"] == "false" and run.calls() == 4, "cache=false must not write"
    run.assert_each_once()


def test_truncated_and_failed_answers_are_never_cached(run_with: Any) -> None:
    run = run_with(min_output_tokens=50, max_output_tokens=60)
    cut = run.task("t1", prompt="Write at length", max_tokens="10")
    assert (cut["status"], cut["stop_reason"], cut["output_tokens"]) == (
        "completed", "max_tokens", "10"
    )  # fmt: skip
    assert run.cache_entries() == []
    again = run.task("t2", prompt="Write at length", max_tokens="10")
    # Nothing may serve it again, not even a coalescing flight that has landed already.
    assert again["cached"] == "false" and run.calls() == 2, "a truncated answer was reused"

    run.fake.update_config(server_error_rate=1.0)
    failed = run.task("f1", prompt="Say hello", type="classify")
    assert failed["status"] == "failed" and "500" in failed["error"], failed
    assert run.cache_entries() == [] and run.calls() == 2
    run.fake.update_config(server_error_rate=0.0)
    retried = run.task("f2", prompt="Say hello", type="classify")
    assert (retried["status"], retried["cached"]) == ("completed", "false")
    assert run.calls() == 3, "the identical task after a failure must call the API"
    assert len(run.cache_entries()) == 1, "its complete answer is cached"
    run.assert_each_once()


def test_cache_ttl_per_task_type(run_with: Any, rclient: redis.Redis) -> None:
    run = run_with(
        "[cache]\nttl_s = 3600\n[cache.ttl_by_type]\nclassify = 0\nextract = 604800\n"
        "moderate = false\n"
    )
    for n in (1, 2):
        run.task(f"c{n}", prompt="Label this", type="classify")
        run.task(f"m{n}", prompt="Moderate this", type="moderate")
    # Neither written nor looked up. (Whether c2 calls again also depends on coalescing:
    # test_truncated_and_failed_answers_are_never_cached holds that line.)
    assert run.cache_entries() == [] and run.counters() == {}
    run.task("e1", prompt="Pull the dates", type="extract")
    run.task("d1", prompt="Write a poem")
    ttls = sorted(rclient.ttl(key) for key in run.cache_entries())
    assert len(ttls) == 2
    assert 3600 - 10 <= ttls[0] <= 3600 and 604_800 - 10 <= ttls[1] <= 604_800
    assert run.task("e2", prompt="Pull the dates", type="extract")["cached"] == "true"
    assert run.counters() == {"cache_misses": 2, "cache_hits": 1}
    run.assert_each_once()


# ---- routing rules --------------------------------------------------------------------------

RULES = """
[claude]
models = { haiku = "claude-haiku-4-5", sonnet = "claude-sonnet-4-5", opus = "claude-opus-4-5" }

[router]
default_family = "sonnet"

[[router.rules]]
types = ["classify", "extract"]
max_prompt_chars = 200
family = "haiku"

[[router.rules]]
min_prompt_chars = 5000
model = "claude-opus-4-1"

[[router.rules]]
types = ["essay"]
min_max_tokens = 2000
family = "opus"

[router.max_tokens_caps]
classify = 20
"""


def test_rules_from_config_route_tasks_end_to_end(run_with: Any) -> None:
    run = run_with(RULES, min_output_tokens=30, max_output_tokens=40)
    short = run.task("r1", prompt="Is this spam?", type="classify")
    assert short["model"] == "claude-haiku-4-5"
    assert (short["stop_reason"], short["output_tokens"]) == ("max_tokens", "20"), "the cap"
    long_ = run.task("r2", prompt="x" * 6000, type="classify")
    assert long_["model"] == "claude-opus-4-1", "a rule may name a full model id"
    assert run.task("r3", prompt="Tell me a story", type="essay")["model"] == "claude-sonnet-4-5"
    essay = run.task("r4", prompt="Tell me a story", type="essay", max_tokens="3000")
    assert essay["model"] == "claude-opus-4-5"
    explicit = run.task("r5", prompt="Is this spam?", type="classify", model="sonnet")
    assert explicit["model"] == "claude-sonnet-4-5", "an explicit model is never re-routed"
    assert explicit["output_tokens"] == "20", "caps bind explicit models too"
    by_id = run.task("r6", prompt="x" * 6000, model="claude-haiku-4-5")
    assert by_id["model"] == "claude-haiku-4-5"
    usage = run.fake.stats()["by_key_family"]
    assert {k: v["succeeded"] for k, v in usage.items()} == {
        "test-key|haiku": 2, "test-key|opus": 2, "test-key|sonnet": 2,
    }  # fmt: skip
    run.assert_each_once()


# ---- prompt caching pass-through ------------------------------------------------------------

CONTEXT = "The pipeline carries each task from a Redis stream to a stored result. " * 110


def blocks(text: str, **cache_control: str) -> str:
    return json.dumps([{"type": "text", "text": text, "cache_control": cache_control}])


def test_cache_control_reaches_the_api_and_cache_usage_comes_back(run_with: Any) -> None:
    run = run_with()
    system = blocks(CONTEXT, type="ephemeral")
    first = run.task("p1", prompt="First question?", system=system)
    second = run.task("p2", prompt="Second question?", system=system)
    context_tokens = (len(CONTEXT.encode()) + 3) // 4
    assert first["cache_creation_input_tokens"] == str(context_tokens)
    assert first["cache_read_input_tokens"] == "0"
    assert second["cache_read_input_tokens"] == str(context_tokens)
    assert second["cache_creation_input_tokens"] == "0"
    assert int(second["input_tokens"]) < 10, "only what follows the breakpoint is plain input"

    # A breakpoint inside a message's content blocks works the same way.
    def message(question: str) -> str:
        content = [
            {"type": "text", "text": CONTEXT, "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": question},
        ]
        return json.dumps([{"role": "user", "content": content}])

    run.task("p3", messages=message("Third?"), type="qa")
    in_message = run.task("p4", messages=message("Fourth?"), type="qa")
    assert in_message["cache_read_input_tokens"] == str(context_tokens)

    # The TTL travels untouched: with 5-minute entries expiring at once, only "1h" is read.
    run.fake.update_config(cache_ttl_s=0.0)
    other = CONTEXT.replace("pipeline", "workflow")
    run.task("h1", prompt="One?", system=blocks(other, type="ephemeral", ttl="1h"))
    hour = run.task("h2", prompt="Two?", system=blocks(other, type="ephemeral", ttl="1h"))
    assert hour["cache_read_input_tokens"] == str(context_tokens)
    five = other.replace("Redis", "Valkey")
    run.task("m1", prompt="One?", system=blocks(five, type="ephemeral"))
    minutes = run.task("m2", prompt="Two?", system=blocks(five, type="ephemeral"))
    assert minutes["cache_read_input_tokens"] == "0"
    assert int(minutes["cache_creation_input_tokens"]) > 0

    stats = run.fake.stats()
    results = [run.rclient.hgetall(run.keys.result(i)) for i in run.ids]
    for field in ("cache_read_input_tokens", "cache_creation_input_tokens", "input_tokens"):
        reported = sum(int(r[field.encode()]) for r in results)
        assert reported == stats["usage"][field], f"{field}: results differ from the API"
    run.assert_each_once()
