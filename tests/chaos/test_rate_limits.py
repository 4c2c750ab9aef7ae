"""The "Rate limits hold" guarantee end to end: worker subprocesses share rate limits through
Redis, against a fake Claude API that enforces its own limits (429 with retry-after and
rate-limit headers).

Every test ends by counting: each task one completed result, Claude paid once per task.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
import redis

from pipeline.claude.ratelimit import key_id
from pipeline.fake_claude import FakeClaudeServer
from pipeline.runtime.keys import Keys
from tests.conftest import StartFake
from tests.helpers.outcomes import tally
from tests.helpers.workers import Workers, wait_until

pytestmark = pytest.mark.chaos
KEY = "sk-ratelimit-test"
HAIKU = "claude-haiku-5-5"


@pytest.fixture
def run(fast_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """`run(fake, toml)`: a Workers set for the real stages, configured by `toml`."""
    made: list[Workers] = []

    def make(fake: FakeClaudeServer, toml: str = "") -> Workers:
        config = tmp_path / "pipeline.toml"
        config.write_text(toml)
        env = {
            **fast_env,
            "ANTHROPIC_BASE_URL": fake.base_url,
            "ANTHROPIC_API_KEY": KEY,
            "PIPELINE_CONFIG": str(config),
            "PIPELINE_RETRY__MAX_ATTEMPTS": "20",
        }
        workers = Workers(env, tmp_path, app="stages:app")
        made.append(workers)
        return workers

    yield make
    for workers in made:
        workers.stop_all()


def submit(client: redis.Redis, prefix: str, n: int, start: int = 0, **fields: str) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for i in range(start, start + n):
        task = {"prompt": f"rate limited task {i}", "model": "haiku", "cache": "false", **fields}
        pipe.xadd(Keys(prefix).ingress, task)
    return [x.decode() for x in pipe.execute()]


def done(client: redis.Redis, prefix: str) -> int:
    return int(client.xlen(Keys(prefix).done))


def limiter_hash(client: redis.Redis, prefix: str, family: str = "haiku") -> dict[str, str]:
    raw = client.hgetall(Keys(prefix).ratelimit(key_id(KEY), family))
    return {k.decode(): v.decode() for k, v in raw.items()}


def test_four_workers_over_the_limits_get_no_burst_of_429s_and_finish_every_task(
    run: Any, start_fake: StartFake, rclient: redis.Redis, prefix: str
) -> None:
    # 180 requests against 120 per minute: the first 120 fit the full bucket, the other
    # 60 must be paced at 2 a second. Limits are not configured: they are learned.
    fake = start_fake(rpm=120, latency_ms=100)
    workers = run(fake)
    workers.start(["cache-check", "router", "store"])
    for _ in range(4):
        workers.start(["claude-call"])
    ids = submit(rclient, prefix, 180)
    started = time.monotonic()
    wait_until(lambda: done(rclient, prefix) >= 180, 120, what="180 results")
    took = time.monotonic() - started
    t = tally(rclient, prefix)
    t.assert_exactly_once(ids)
    assert t.completed() == 180
    stats = fake.stats()
    assert stats["max_calls_per_request"] == 1
    assert stats["by_status"].get("429", 0) <= 1, stats["by_status"]
    assert took > 25, f"180 calls at 120/min took only {took:.0f}s: the limit did not hold"
    state = limiter_hash(rclient, prefix)
    assert state["lr"] == "120"  # learned from the API's headers


def test_settlement_reserved_minus_refunded_equals_what_the_api_counted(
    run: Any, start_fake: StartFake, rclient: redis.Redis, prefix: str
) -> None:
    fake = start_fake(itpm=1_000_000, otpm=1_000_000, latency_ms=20)
    workers = run(fake, "[ratelimit.limits.haiku]\nrpm = 10000\n")
    workers.start()
    workers.start(["claude-call"])
    system = "You answer in one line. " * 60
    ids = submit(rclient, prefix, 60, max_tokens="300", system=system)
    wait_until(lambda: done(rclient, prefix) >= 60, 60, what="60 results")
    assert tally(rclient, prefix).completed() == 60
    state = limiter_hash(rclient, prefix)
    usage = fake.stats()["usage"]
    charged_in = int(state["res_i"]) - int(state["ref_i"])
    charged_out = int(state["res_o"]) - int(state["ref_o"])
    assert charged_out == usage["output_tokens"]
    assert charged_in == usage["input_tokens"] + usage["cache_creation_input_tokens"]
    assert int(state["res_o"]) == 300 * 60  # output reserved at max_tokens
    assert int(state["res_i"]) >= charged_in  # the estimate never undershot here
    assert len(ids) == 60


def test_a_sigkilled_workers_concurrency_slots_come_back_after_the_lease(
    run: Any, start_fake: StartFake, rclient: redis.Redis, prefix: str
) -> None:
    fake = start_fake(latency_ms=30_000)
    toml = (
        "[ratelimit]\nslot_lease_ms = 2000\n"
        '[[ratelimit.keys]]\nname = "main"\nmax_concurrency = 3\n'
        "[ratelimit.limits.haiku]\nrpm = 10000\nitpm = 10000000\notpm = 10000000\n"
    )
    workers = run(fake, toml)
    workers.start(["cache-check", "router", "store"])
    victim = workers.start(["claude-call"])
    slots = Keys(prefix).slots(key_id(KEY))

    def live_slots() -> int:
        return int(rclient.zcount(slots, int(time.time() * 1000), "+inf"))

    ids = submit(rclient, prefix, 5)
    wait_until(lambda: live_slots() == 3, 20, what="the victim to hold all 3 slots")
    time.sleep(2.5)  # past one lease: a live holder renews them
    assert live_slots() == 3 and fake.stats()["inflight"] == 3  # the other 2 wait for slots
    victim.signal(signal.SIGKILL)
    killed = time.monotonic()
    took = wait_until(lambda: live_slots() == 0, 10, what="the dead worker's slots to lapse")
    assert took <= 2.0 + 1.0, f"slots came back after {took:.1f}s, lease is 2s"
    fake.update_config(latency_ms=10)
    workers.start(["claude-call"])
    wait_until(lambda: done(rclient, prefix) >= 5, 30, what="all 5 results")
    t = tally(rclient, prefix)
    t.assert_exactly_once(ids)
    assert t.completed() == 5
    assert time.monotonic() - killed < 30


def test_one_429_cools_the_family_down_for_every_worker_until_retry_after(
    run: Any, start_fake: StartFake, rclient: redis.Redis, prefix: str
) -> None:
    # Someone else spends the whole key just before: our configured bucket is full, the
    # API's is empty. Our first call meets a 429 (retry-after 5 s); no worker may call
    # again before it has passed.
    fake = start_fake(rpm=12, latency_ms=10)
    toml = "[ratelimit.limits.haiku]\nrpm = 12\nitpm = 1000000\notpm = 1000000\n"
    workers = run(fake, toml)
    workers.start(["cache-check", "router", "store"])
    callers = [workers.start(["claude-call"]) for _ in range(2)]
    wait_until(lambda: all("running claude-call" in w.log() for w in callers), 30,
               what="both claude-call workers running")  # fmt: skip
    sdk = anthropic.Anthropic(api_key=KEY, base_url=fake.base_url, max_retries=0)
    with pytest.raises(anthropic.RateLimitError):
        for _ in range(13):
            sdk.messages.create(
                model=HAIKU, max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
    theirs = fake.stats()["by_status"]["429"]
    first = submit(rclient, prefix, 1)
    wait_until(lambda: fake.stats()["by_status"]["429"] > theirs, 30, what="our first 429")
    hit = time.monotonic()
    wait_until(lambda: "n429" in limiter_hash(rclient, prefix), 5, what="the 429 settled")
    cooled = limiter_hash(rclient, prefix)
    assert "cool" in cooled and int(cooled["n429"]) == 1
    more = submit(rclient, prefix, 2, start=1)
    calls = fake.stats()["requests_total"]
    time.sleep(3.5)  # well inside the 5 s retry-after
    assert fake.stats()["requests_total"] == calls, "a worker called during the cool-down"
    wait_until(lambda: done(rclient, prefix) >= 3, 60, what="all 3 results")
    assert time.monotonic() - hit >= 4.0
    t = tally(rclient, prefix)
    t.assert_exactly_once(first + more)
    assert t.completed() == 3
    assert fake.stats()["by_status"]["429"] == theirs + 1


def test_several_api_keys_share_the_load_each_within_its_own_limits(
    run: Any, start_fake: StartFake, rclient: redis.Redis, prefix: str
) -> None:
    # Each key may make 30 requests a minute: 60 tasks fit at once only if both are used.
    fake = start_fake(rpm=30, latency_ms=20)
    toml = (
        '[[ratelimit.keys]]\nname = "first"\nenv = "ANTHROPIC_API_KEY"\n'
        '[[ratelimit.keys]]\nname = "second"\nenv = "BENCH_SECOND_KEY"\n'
        "[ratelimit.limits.haiku]\nrpm = 30\nitpm = 1000000\notpm = 1000000\n"
    )
    workers = run(fake, toml)
    second = {"BENCH_SECOND_KEY": "sk-second-key"}
    workers.start(["cache-check", "router", "store"])
    workers.start(["claude-call"], extra_env=second)
    workers.start(["claude-call"], extra_env=second)
    ids = submit(rclient, prefix, 60)
    took = wait_until(lambda: done(rclient, prefix) >= 60, 60, what="60 results")
    t = tally(rclient, prefix)
    t.assert_exactly_once(ids)
    assert t.completed() == 60
    by_key = fake.stats()["by_key_family"]
    assert by_key[f"{KEY}|haiku"]["succeeded"] == 30
    assert by_key["sk-second-key|haiku"]["succeeded"] == 30
    assert fake.stats()["by_status"].get("429", 0) == 0
    assert took < 30, "with both keys nothing had to wait for a refill"
