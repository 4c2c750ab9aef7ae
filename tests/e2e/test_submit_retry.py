"""A producer's retry after an ambiguous failure, end to end (issue 13).

`Client.submit_many` loses its connection with the batch in flight: after Redis ran the
transaction (the batch is in, the producer never hears) or before (nothing is in). The
producer cannot tell which, so it sends the batch again, as the error hands it back (same
ids; the client assigned ids to the tasks that had none). Either way, the real four stages
against the fake Claude API must run each task exactly once: one paid call per distinct
request, one result and one completion event per id, nothing dead-lettered.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from pipeline.client import Client, SubmitFailed
from pipeline.runtime.keys import Keys
from tests.conftest import StartFake
from tests.helpers.cut_proxy import Cut, CutProxy
from tests.helpers.outcomes import assert_drained
from tests.helpers.workers import Workers, wait_until

pytestmark = pytest.mark.chaos
STREAMS = ("tasks", "route", "call:haiku", "call:sonnet", "call:opus", "store")
N = 40


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[CutProxy]:
    cut = await CutProxy(redis_url).start()
    yield cut
    await cut.aclose()


def batch() -> list[dict[str, object]]:
    """Distinct requests, half with the producer's own ids, mixed types; `cache=false`, so
    that a task run twice is paid twice (the response cache would hide a second run)."""
    kinds = ["classify", "extract", "summarise", "analyse"]
    return [
        {"prompt": f"Task {n}: name a colour.", "type": kinds[n % 4], "max_tokens": 100,
         "cache": False, **({"id": f"order-{n}"} if n % 2 else {})}
        for n in range(N)
    ]  # fmt: skip


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["after-exec", "before-exec"])
async def test_a_batch_sent_again_after_a_lost_connection_runs_each_task_once(
    how: Cut, proxy: CutProxy, start_fake: StartFake, fast_env: dict[str, str],
    rclient: redis.Redis, prefix: str, tmp_path: Path,
) -> None:  # fmt: skip
    keys = Keys(prefix)
    async with Client(proxy.url, prefix) as client:
        await client.backlog()  # connected (and the backlog measured) before the cut
        proxy.cut(how)
        with pytest.raises(SubmitFailed) as caught:
            await client.submit_many(batch())
        failed = caught.value
        assert failed.maybe_added, "a connection lost mid-send must not claim nothing landed"
        ids = await client.submit_many(failed.tasks)  # what the producer does: send it again
    assert ids == failed.ids and len(set(ids)) == N
    assert rclient.xlen(keys.ingress) == (2 * N if how == "after-exec" else N)

    fake = start_fake(latency_ms=50)
    env = {**fast_env, "ANTHROPIC_BASE_URL": fake.base_url, "ANTHROPIC_API_KEY": "good-key",
           "PIPELINE_RATELIMIT__PROBE_MS": "1000"}  # fmt: skip
    workers = Workers(env, tmp_path, app="stages:app")
    try:
        workers.start()

        def settled() -> bool:
            done = Counter(f[b"id"].decode() for _, f in rclient.xrange(keys.done))
            if any(done[i] == 0 for i in ids):
                return False
            try:
                assert_drained(rclient, prefix, STREAMS)
            except (AssertionError, redis.ResponseError):
                return False
            return True

        wait_until(settled, 15, every=0.1, what=f"{N} tasks answered and every stream drained")
    finally:
        workers.stop_all()

    done = Counter(f[b"id"].decode() for _, f in rclient.xrange(keys.done))
    assert done == Counter(ids), f"completion events per id: {done}"
    results = {i: rclient.hgetall(keys.result(i)) for i in ids}
    assert all(r.get(b"status") == b"completed" for r in results.values()), results
    assert all(r[b"cached"] == b"false" for r in results.values())
    assert rclient.xlen(keys.dlq) == 0, "a copy sent again was refused instead of dropped"
    calls = int(fake.stats()["requests_total"])
    assert calls == N, f"{calls} paid calls for {N} distinct requests"
