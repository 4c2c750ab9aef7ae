"""Taking letters out of the DLQ (`pipeline dlq replay/purge`), on a real Redis: what a replay
frees and keeps of its task, and two operators at once."""

from __future__ import annotations

import anyio
import pytest
from redis.asyncio import Redis

from pipeline.runtime.dlq import DeadLetters, dlq_fields, raw_entry
from pipeline.runtime.keys import Keys

pytestmark = pytest.mark.anyio
LIVE_TTL_S = 7 * 86_400


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


async def add_letter(
    r: Redis, keys: Keys, task_id: str, entry: dict[bytes, bytes],
    owner: str = "", kept: bool = False,
) -> str:  # fmt: skip
    """A letter as the hand-off writes it (with its bytes counted)."""
    letter = dlq_fields(
        task_id=task_id, stage="cache-check", stream=keys.ingress, entry_id="1-0",
        error="bad", deliveries=1, attempts=1, fields={}, traceparent=None, tracestate=None,
        max_field_bytes=16_384, entry=raw_entry(entry), owner=owner, result_kept=kept,
    )  # fmt: skip
    dlq_id = (await r.xadd(keys.dlq, letter)).decode()  # type: ignore[arg-type]
    await r.incrby(keys.dlq_bytes, int(letter["size"]))
    return dlq_id


async def test_a_replay_frees_the_id_and_keeps_what_it_paid_for(r_keys: tuple[Redis, Keys]) -> None:
    """The replayed entry is admitted afresh (no `fp`/`entry`/`holder`), its old `failed`
    result goes, and the answer already paid for stays: the replay uses it, pays nothing."""
    r, keys = r_keys
    record = keys.task("t1")
    await r.hset(
        record,
        mapping={"fp": "f", "entry": "5-0", "holder": "h", "fence": 1, "req": "b",
                 "answer": "a", "paid:1": 1, "counted": 1},
    )  # fmt: skip
    await r.expire(record, 60)  # the failed result's TTL
    await r.hset(keys.result("t1"), "status", "failed")
    dlq_id = await add_letter(r, keys, "t1", {b"id": b"t1", b"prompt": b"hi"}, owner="5-0")
    assert await DeadLetters(r, keys, LIVE_TTL_S).replay([dlq_id]) == [dlq_id]
    assert not await r.exists(keys.result("t1"))
    assert await r.hgetall(record) == {
        b"fence": b"1",
        b"req": b"b",
        b"answer": b"a",
        b"paid:1": b"1",
        b"counted": b"1",
    }
    assert await r.ttl(record) > LIVE_TTL_S - 60  # live again
    ((_, fields),) = await r.xrange(keys.ingress)
    assert fields == {b"id": b"t1", b"prompt": b"hi"}
    assert await r.xlen(keys.dlq) == 0 and int(await r.get(keys.dlq_bytes) or 0) == 0


async def test_a_task_without_an_id_is_replayed_under_its_own(r_keys: tuple[Redis, Keys]) -> None:
    """A producer entry without `id` was known by its entry id; the replayed entry is a new
    stream entry, so it carries that id explicitly (else its answer lands under another)."""
    r, keys = r_keys
    eid = "1700000000000-0"
    dlq_id = await add_letter(r, keys, eid, {b"prompt": b"hi"}, owner=eid)
    await DeadLetters(r, keys, LIVE_TTL_S).replay([dlq_id])
    ((_, fields),) = await r.xrange(keys.ingress)
    assert fields == {b"prompt": b"hi", b"id": b"1700000000000-0"}


async def test_a_replay_never_frees_an_id_another_entry_owns(r_keys: tuple[Redis, Keys]) -> None:
    """A stray copy under a live task's id failed on its own: replaying it must not remove
    the live task's result or admission."""
    r, keys = r_keys
    await r.hset(keys.task("q"), mapping={"fp": "f", "entry": "9-0"})
    await r.hset(keys.result("q"), "status", "completed")
    dlq_id = await add_letter(r, keys, "q", {b"id": b"q", b"prompt": b"x"}, owner="8-0")
    await DeadLetters(r, keys, LIVE_TTL_S).replay([dlq_id])
    assert await r.hget(keys.result("q"), "status") == b"completed"
    assert await r.hget(keys.task("q"), "entry") == b"9-0"
    kept = await add_letter(r, keys, "q", {b"id": b"q", b"prompt": b"y"}, kept=True)
    await DeadLetters(r, keys, LIVE_TTL_S).replay([kept])
    assert await r.hget(keys.result("q"), "status") == b"completed"


async def test_two_operators_taking_one_letter_take_it_once(r_keys: tuple[Redis, Keys]) -> None:
    """Replay and purge of one letter at once: one entry goes back, the byte count drops
    by the letter's size once (it used to drop twice and drift below what the DLQ holds)."""
    r, keys = r_keys
    dlqs = DeadLetters(r, keys, LIVE_TTL_S)
    for _ in range(10):
        dlq_id = await add_letter(r, keys, "c", {b"id": b"c", b"prompt": b"x" * 100})
        other = await add_letter(r, keys, "d", {b"id": b"d", b"prompt": b"y"})
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(dlqs.replay, [dlq_id])
                tg.start_soon(dlqs.purge, [dlq_id])
        ((_, left),) = await r.xrange(keys.dlq)
        assert int(await r.get(keys.dlq_bytes) or 0) == int(left[b"size"])
        assert await dlqs.purge([other, other]) == 1
        assert int(await r.get(keys.dlq_bytes) or 0) == 0
    assert await r.xlen(keys.ingress) <= 10


@pytest.fixture
def r_keys(aredis: Redis, keys: Keys) -> tuple[Redis, Keys]:
    return aredis, keys
