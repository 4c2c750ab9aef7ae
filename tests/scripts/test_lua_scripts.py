"""The Lua scripts, called directly on a real Redis: hand-off, fencing, leases, retries, names."""

from __future__ import annotations

import anyio
import pytest
from redis.asyncio import Redis

from pipeline.claude.scripts import load as load_claude_script
from pipeline.runtime.handoff import Record, build_call
from pipeline.runtime.keys import Keys
from pipeline.runtime.scripts import Scripts
from pipeline.runtime.wire import (
    ENVELOPE_FIELD,
    WIRE_VERSION,
    Envelope,
    decode_entry,
    encode_body,
    encode_envelope,
)

pytestmark = pytest.mark.anyio
GROUP = "g"
A, B = "worker-a", "worker-b"
LEASE_MS = 60_000
LIVE_TTL_S = 7 * 86_400  # a task record's TTL while its task has no result


@pytest.fixture
def r(aredis: Redis) -> Redis:
    return aredis


@pytest.fixture
def scripts(r: Redis) -> Scripts:
    return Scripts.register(r)


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


# --- helpers ---------------------------------------------------------------------------------


async def make_stream(r: Redis, stream: str, n: int) -> list[str]:
    await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    return [(await r.xadd(stream, {"n": str(i)})).decode() for i in range(n)]


async def read(r: Redis, stream: str, consumer: str, count: int = 1000) -> list[str]:
    reply = await r.xreadgroup(GROUP, consumer, {stream: ">"}, count=count)
    return [eid.decode() for eid, _ in reply[0][1]] if reply else []


async def pending(r: Redis, stream: str) -> dict[str, tuple[str, int, int]]:
    """entry id -> (owner, deliveries, idle ms)."""
    rows = await r.xpending_range(stream, GROUP, min="-", max="+", count=10_000)
    return {
        row["message_id"].decode(): (
            row["consumer"].decode(),
            int(row["times_delivered"]),
            int(row["time_since_delivered"]),
        )
        for row in rows
    }


async def steal(r: Redis, stream: str, consumer: str, *ids: str) -> None:
    """Another worker reclaims entries (delivery count + 1)."""
    await r.xclaim(stream, GROUP, consumer, 0, list(ids))


async def age(r: Redis, stream: str, owner: str, *ids: str, idle_ms: int = 100_000) -> None:
    """Make entries look idle for `idle_ms` without changing owner or delivery count."""
    await r.xclaim(stream, GROUP, owner, 0, list(ids), idle=idle_ms, justid=True)


async def handoff(
    scripts: Scripts, stream: str, records: list[Record], consumer: str = A
) -> list[int]:
    keys, packed = build_call(stream, records)
    # The records travel as one packed argument (or, in the older layout, as a flat list).
    tail = [packed] if isinstance(packed, bytes) else list(packed)
    reply = await scripts.handoff(keys=keys, args=[GROUP, consumer, "0", *tail])
    return [int(x) for x in reply]


async def server_ms(r: Redis) -> int:
    sec, usec = await r.time()
    return sec * 1000 + usec // 1000


def as_dict(flat: list[bytes]) -> dict[bytes, bytes]:
    it = iter(flat)
    return dict(zip(it, it, strict=True))


# --- handoff.lua -----------------------------------------------------------------------------


async def test_handoff_forwards_acks_and_deletes(r: Redis, scripts: Scripts, keys: Keys) -> None:
    src, dst = keys.stream("route"), keys.stream("call", "haiku")
    ids = await make_stream(r, src, 3)
    assert await read(r, src, A) == ids
    records = []
    for i, eid in enumerate(ids):
        rec = Record(eid, 1)
        rec.xadd(dst, {"n": str(i), "_env": b"\x01\xff"})
        records.append(rec)
    assert await handoff(scripts, src, records) == [1, 1, 1]
    assert await r.xlen(src) == 0
    assert await pending(r, src) == {}
    out = await r.xrange(dst)
    assert [f for _, f in out] == [{b"n": str(i).encode(), b"_env": b"\x01\xff"} for i in range(3)]


async def test_handoff_carries_binary_envelopes_unchanged(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    """What the runtime sends: packed envelopes (arbitrary bytes) as field values and members."""
    src, dst = keys.stream("route"), keys.stream("call", "haiku")
    ids = await make_stream(r, src, 2)
    await read(r, src, A)
    env = Envelope(
        v=WIRE_VERSION,
        task_id="t-\u00e9",
        fields={"prompt": "hi"},
        attempt=2,
        origin_ms=1,
        enqueued_ms=2,
        body=encode_body({"raw": b"\x00\xff\xc4"}),
    )
    packed = encode_envelope(env)
    forward = Record(ids[0], 1)
    forward.xadd(dst, {ENVELOPE_FIELD: packed})
    retry = Record(ids[1], 1)
    retry.zadd(keys.delayed(src), 0, packed)
    assert await handoff(scripts, src, [forward, retry]) == [1, 1]
    ((_, fields),) = await r.xrange(dst)
    assert fields == {ENVELOPE_FIELD: packed}
    assert decode_entry("1-0", fields, 1 << 20) == env
    assert await r.zrange(keys.delayed(src), 0, -1) == [packed]
    assert await r.xlen(src) == 0


async def test_handoff_is_fenced_after_another_worker_reclaimed(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    src, dst = keys.stream("route"), keys.stream("store")
    (eid,) = await make_stream(r, src, 1)
    await read(r, src, A)
    await steal(r, src, B, eid)
    rec = Record(eid, 1)
    rec.xadd(dst, {"late": "yes"})
    rec.zadd(keys.delayed(dst), 10, b"member")
    await r.hset(keys.task("t1"), "holder", "b's claim")
    await r.expire(keys.task("t1"), LIVE_TTL_S)
    rec.result(
        keys.result("t1"), 60, {"status": "completed"}, keys.done, 100, {"id": "t1"},
        keys.task("t1"),
    )  # fmt: skip
    assert await handoff(scripts, src, [rec]) == [0]
    assert await r.exists(dst, keys.delayed(dst), keys.result("t1"), keys.done) == 0
    assert await r.ttl(keys.task("t1")) > LIVE_TTL_S - 60, "a fenced record keeps its TTL"
    assert await r.xlen(src) == 1
    assert {k: v[:2] for k, v in (await pending(r, src)).items()} == {eid: (B, 2)}
    # The new owner, with the delivery count it read, can hand it on.
    rec = Record(eid, 2)
    rec.xadd(dst, {"on": "time"})
    assert await handoff(scripts, src, [rec], consumer=B) == [1]
    assert await r.xlen(dst) == 1
    assert await r.xlen(src) == 0
    assert await pending(r, src) == {}


async def test_handoff_fence_checks_each_record_of_a_batch(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    src, dst = keys.stream("route"), keys.stream("store")
    ids = await make_stream(r, src, 3)
    await read(r, src, A)
    await steal(r, src, B, ids[1])
    records = []
    for i, eid in enumerate(ids):
        await r.hset(keys.task(f"t{i}"), "counted", "1")
        await r.expire(keys.task(f"t{i}"), LIVE_TTL_S)
        rec = Record(eid, 1)
        rec.result(
            keys.result(f"t{i}"), 60, {"i": str(i)}, keys.done, 100, {"id": f"t{i}"},
            keys.task(f"t{i}"),
        )  # fmt: skip
        rec.xadd(dst, {"i": str(i)})
        records.append(rec)
    assert await handoff(scripts, src, records) == [1, 0, 1]
    assert [f[b"i"] for _, f in await r.xrange(dst)] == [b"0", b"2"]
    assert await r.exists(keys.result("t0"), keys.result("t1"), keys.result("t2")) == 2
    ttls = [await r.ttl(keys.task(f"t{i}")) for i in range(3)]
    assert 0 < ttls[0] <= 60 and 0 < ttls[2] <= 60, "records expire with their results"
    assert ttls[1] > LIVE_TTL_S - 60, "the fenced record is untouched"
    assert await r.xlen(keys.done) == 2
    assert [eid.decode() for eid, _ in await r.xrange(src)] == [ids[1]]
    assert list(await pending(r, src)) == [ids[1]]


async def test_handoff_fence_refuses_entry_no_longer_pending(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    src, dst = keys.stream("route"), keys.stream("store")
    (eid,) = await make_stream(r, src, 1)
    await read(r, src, A)
    await r.xack(src, GROUP, eid)
    rec = Record(eid, 1)
    rec.xadd(dst, {"x": "1"})
    assert await handoff(scripts, src, [rec]) == [0]
    assert await r.exists(dst) == 0


async def test_handoff_expected_zero_skips_the_fence(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    src, dst = keys.stream("tasks"), keys.stream("route")
    (eid,) = await make_stream(r, src, 1)
    await read(r, src, A)
    await steal(r, src, B, eid)
    rec = Record(eid, 0)
    rec.xadd(dst, {"x": "1"})
    assert await handoff(scripts, src, [rec]) == [1]
    assert await r.xlen(dst) == 1
    assert await r.xlen(src) == 0
    assert await pending(r, src) == {}


async def test_handoff_result_first_writer_wins_with_ttl(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    src = keys.stream("store")
    ids = await make_stream(r, src, 2)
    await read(r, src, A)
    res, record = keys.result("task-1"), keys.task("task-1")
    await r.hset(record, mapping={"req": "h:m:64", "answer": "packed", "counted": "1"})
    await r.expire(record, LIVE_TTL_S)  # a live task's record lives long ...
    first = Record(ids[0], 1)
    first.result(res, 120, {"status": "completed", "output": "first"}, keys.done, 1000,
                 {"id": "1"}, record)  # fmt: skip
    second = Record(ids[1], 1)
    second.result(res, 999, {"status": "failed", "error": "late"}, keys.done, 1000,
                  {"id": "1"}, record)  # fmt: skip
    assert await handoff(scripts, src, [first]) == [1]
    ttl = await r.ttl(res)
    assert 0 < ttl <= 120
    assert 0 < await r.ttl(record) <= 120  # ... and then exactly as long as its result
    assert await handoff(scripts, src, [second]) == [2]
    assert await r.hgetall(res) == {b"status": b"completed", b"output": b"first"}
    assert 0 < await r.ttl(res) <= 120  # the loser did not extend the TTL
    assert 0 < await r.ttl(record) <= 120  # nor the record's
    assert await r.hgetall(record) == {b"req": b"h:m:64", b"answer": b"packed", b"counted": b"1"}
    done = await r.xrange(keys.done)
    assert [f for _, f in done] == [{b"id": b"1"}]
    # Status 2 is still a hand-off: the duplicate is acked and deleted.
    assert await r.xlen(src) == 0
    assert await pending(r, src) == {}


async def test_handoff_result_without_a_task_record_creates_none(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    """A task that never needed a record (no producer id, no call, ledger off) gets none."""
    src = keys.stream("store")
    (eid,) = await make_stream(r, src, 1)
    await read(r, src, A)
    rec = Record(eid, 1)
    rec.result(keys.result("t1"), 120, {"status": "completed"}, keys.done, 1000, {"id": "t1"},
               keys.task("t1"))  # fmt: skip
    assert await handoff(scripts, src, [rec]) == [1]
    assert 0 < await r.ttl(keys.result("t1")) <= 120
    assert not await r.exists(keys.task("t1"))


async def test_handoff_writes_no_result_for_a_stray_copy_of_an_owned_id(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    """A second ingress entry under a live task's id that fails on its own (too many
    deliveries, unreadable) must not answer the live task with its failure."""
    src = keys.stream("tasks")
    stray, own = await make_stream(r, src, 2)
    await read(r, src, A)
    res, record = keys.result("q-1"), keys.task("q-1")
    await r.hset(record, mapping={"fp": "f", "entry": own})
    for entry_id, owner, expected in ((stray, stray, [2]), (own, own, [1])):
        rec = Record(entry_id, 1)
        rec.result(res, 120, {"status": "failed", "by": entry_id}, keys.done, 1000,
                   {"id": "q-1"}, record, owner)  # fmt: skip
        assert await handoff(scripts, src, [rec]) == expected
    assert await r.hget(res, "by") == own.encode()  # only the owner's failure is the task's
    assert await r.xlen(keys.done) == 1


async def test_handoff_checks_the_whole_batch_before_writing_anything(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    """Redis restarted without its data (NOGROUP) while a batch was in flight: the script
    fails before its first write, so the retry after the group is recreated is not a
    second hand-off of the records that came first."""
    src, dst = keys.stream("tasks"), keys.stream("route")
    ids = await make_stream(r, src, 2)
    await read(r, src, A)
    await r.xgroup_destroy(src, GROUP)
    unfenced, fenced = Record(ids[0], 0), Record(ids[1], 1)
    unfenced.xadd(dst, {"x": "1"})
    fenced.xadd(dst, {"x": "2"})
    with pytest.raises(Exception, match="NOGROUP"):
        await handoff(scripts, src, [unfenced, fenced])
    assert await r.xlen(dst) == 0


async def test_handoff_zadd_due_at_server_time_plus_delay(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    src = keys.stream("call", "haiku")
    delayed = keys.delayed(src)
    (eid,) = await make_stream(r, src, 1)
    await read(r, src, A)
    rec = Record(eid, 1)
    rec.zadd(delayed, 5000, b"packed-envelope")
    before = await server_ms(r)
    assert await handoff(scripts, src, [rec]) == [1]
    after = await server_ms(r)
    score = await r.zscore(delayed, b"packed-envelope")
    assert score is not None
    assert before + 5000 <= score <= after + 5000
    assert await r.xlen(src) == 0
    assert await pending(r, src) == {}


async def test_handoff_dead_letter_maxlen_trims_approximately(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    src = keys.stream("route")
    n, maxlen = 300, 10
    ids = await make_stream(r, src, n)
    await read(r, src, A)
    records = []
    for eid in ids:
        rec = Record(eid, 1)
        rec.xadd(keys.dlq, {"entry_id": eid, "error": "boom"}, maxlen=maxlen)
        rec.xadd(keys.app_key("untrimmed"), {"entry_id": eid})
        records.append(rec)
    assert await handoff(scripts, src, records) == [1] * n
    node = int((await r.config_get("stream-node-max-entries"))["stream-node-max-entries"])
    size = await r.xlen(keys.dlq)
    assert maxlen <= size <= maxlen + node < n
    newest = await r.xrevrange(keys.dlq, count=1)
    assert newest[0][1][b"entry_id"].decode() == ids[-1]  # trimming drops the oldest
    assert await r.xlen(keys.app_key("untrimmed")) == n  # maxlen 0: no trimming
    assert await r.xlen(src) == 0


async def test_handoff_letters_keep_the_dlq_within_its_letters_and_its_bytes(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    """The DLQ is bounded in bytes as well as letters: the oldest letters go first, the
    newest never, and the byte counter always equals what the letters left hold."""
    src = keys.stream("route")
    ids = await make_stream(r, src, 12)
    await read(r, src, A)

    def letter(eid: str, size: int) -> Record:
        rec = Record(eid, 1)
        fields = {"task_id": eid, "entry": b"\x00" * size, "size": str(size)}
        rec.letter(keys.dlq, keys.dlq_bytes, 5, 10_000, fields)
        return rec

    sizes = [1000, 2000, 3000, 4000, 1500, 100, 100, 100, 100, 100, 100, 50_000]
    for eid, size in zip(ids, sizes, strict=True):  # one batch each: trimming as they come
        assert await handoff(scripts, src, [letter(eid, size)]) == [1]
        left = [f for _, f in await r.xrange(keys.dlq)]
        held = sum(int(f[b"size"]) for f in left)
        assert int(await r.get(keys.dlq_bytes) or 0) == held
        assert len(left) <= 5 and (held <= 10_000 or len(left) == 1)
        assert left[-1][b"task_id"].decode() == eid  # never the newest
    # the last letter alone is over the byte bound: it is kept, everything older went
    assert [f[b"task_id"].decode() for _, f in await r.xrange(keys.dlq)] == [ids[-1]]


async def test_reclaim_takes_nothing_just_after_redis_was_stalled(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    """After a silence longer than the gap (a slow script, CLIENT PAUSE), every lease looks
    lapsed though the owners are alive: reclaims wait one more gap so they can renew."""
    src = keys.stream("route")
    clock = keys.reclaim_clock(src)
    await make_stream(r, src, 3)
    await read(r, src, A)
    args = [GROUP, B, 0, "0-0", 10, 300]  # idle 0: everything counts as lapsed
    t = await server_ms(r)
    await r.hset(clock, "seen", t - 1000)  # the last reclaim ran a second ago: a stall
    assert await scripts.reclaim(keys=[src, clock], args=args) == [b"0-0", []]
    waited_from = await server_ms(r)
    claimed: list[object] = []
    while not claimed:  # reclaims keep running (every 100 ms here), taking nothing at first
        await anyio.sleep(0.1)
        _, claimed = await scripts.reclaim(keys=[src, clock], args=args)
    assert len(claimed) == 3
    assert 550 <= await server_ms(r) - waited_from < 1500  # two gaps (600 ms), not more


async def test_a_worker_with_no_free_slot_keeps_the_reclaim_clock_going(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    """A busy fleet calls with a count of 0: nothing is claimed, and the clock does not take
    the busy time for a stalled Redis, so the first real reclaim after it takes at once."""
    src = keys.stream("route")
    clock = keys.reclaim_clock(src)
    await make_stream(r, src, 2)
    await read(r, src, A)
    for _ in range(5):  # 500 ms of ticks from a full worker: longer than the 300 ms gap
        assert await scripts.reclaim(keys=[src, clock], args=[GROUP, B, 0, "0-0", 0, 300]) == [
            b"0-0", [],
        ]  # fmt: skip
        await anyio.sleep(0.1)
    _, claimed = await scripts.reclaim(keys=[src, clock], args=[GROUP, B, 0, "0-0", 10, 300])
    assert len(claimed) == 2


# --- renew.lua -------------------------------------------------------------------------------


async def test_renew_resets_idle_of_own_entries(r: Redis, scripts: Scripts, keys: Keys) -> None:
    src = keys.stream("call", "sonnet")
    ids = await make_stream(r, src, 2)
    await read(r, src, A)
    await age(r, src, A, *ids)
    assert all(idle >= 100_000 for _, _, idle in (await pending(r, src)).values())
    lost = await scripts.renew(keys=[src], args=[GROUP, A, 0, ids[0], 1, ids[1], 1])
    assert lost == []
    after = await pending(r, src)
    for eid in ids:
        owner, deliveries, idle = after[eid]
        assert (owner, deliveries) == (A, 1)
        assert idle < 5000


async def test_renew_never_takes_back_a_reclaimed_entry(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    src = keys.stream("call", "sonnet")
    ids = await make_stream(r, src, 3)
    await read(r, src, A)
    await steal(r, src, B, ids[1])
    await r.xack(src, GROUP, ids[2])  # handed on meanwhile: not pending any more
    await age(r, src, A, ids[0])
    args = [GROUP, A, 0, ids[0], 1, ids[1], 1, ids[2], 1]
    lost = await scripts.renew(keys=[src], args=args)
    assert sorted(x.decode() for x in lost) == sorted(ids[1:])
    after = await pending(r, src)
    assert after[ids[0]][:2] == (A, 1)
    assert after[ids[0]][2] < 5000
    assert after[ids[1]][:2] == (B, 2)
    assert ids[2] not in after


async def test_renew_refuses_own_entry_with_a_newer_delivery_count(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    src = keys.stream("route")
    (eid,) = await make_stream(r, src, 1)
    await read(r, src, A)
    await steal(r, src, A, eid)  # redelivered to the same name (a restart): count is now 2
    await age(r, src, A, eid)
    assert await scripts.renew(keys=[src], args=[GROUP, A, 0, eid, 1]) == [eid.encode()]
    owner, deliveries, idle = (await pending(r, src))[eid]
    assert (owner, deliveries) == (A, 2)
    assert idle >= 100_000


async def test_renew_with_lease_idle_hands_entry_back(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    src = keys.stream("route")
    (eid,) = await make_stream(r, src, 1)
    await read(r, src, A)
    assert await scripts.renew(keys=[src], args=[GROUP, A, LEASE_MS, eid, 1]) == []
    owner, deliveries, idle = (await pending(r, src))[eid]
    assert (owner, deliveries) == (A, 0)  # a hand-back is not a delivery: the reclaim adds it
    assert idle >= LEASE_MS
    _, claimed = await scripts.reclaim(
        keys=[src, f"{src}:clock"], args=[GROUP, B, LEASE_MS, "0-0", 10, 60_000]
    )
    assert [(c[0].decode(), c[2]) for c in claimed] == [(eid, 1)]
    assert (await pending(r, src))[eid][:2] == (B, 1)


async def test_renew_hand_backs_never_add_up_to_a_delivery(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    """Deploys hand an entry back again and again: its count stays that of real deliveries."""
    src = keys.stream("route")
    (eid,) = await make_stream(r, src, 1)
    await read(r, src, A)
    await steal(r, src, A, eid)  # a real redelivery: 2
    consumers, expected = [A, B], 2
    for turn in range(3):
        owner = consumers[turn % 2]
        args: list[str | int] = [GROUP, owner, LEASE_MS, eid, expected]
        assert await scripts.renew(keys=[src], args=args) == []
        assert (await pending(r, src))[eid][:2] == (owner, expected - 1)
        other = consumers[(turn + 1) % 2]
        _, claimed = await scripts.reclaim(
            keys=[src, f"{src}:clock"], args=[GROUP, other, LEASE_MS, "0-0", 10, 60_000]
        )
        assert [(c[0].decode(), c[2]) for c in claimed] == [(eid, 2)]
    # A hand-back with a stale delivery count is refused like any renewal, and changes nothing.
    assert await scripts.renew(keys=[src], args=[GROUP, B, LEASE_MS, eid, 1]) == [eid.encode()]
    assert (await pending(r, src))[eid][:2] == (B, 2)


# --- reclaim.lua -----------------------------------------------------------------------------


async def test_reclaim_takes_only_lapsed_entries(r: Redis, scripts: Scripts, keys: Keys) -> None:
    src = keys.stream("route")
    ids = await make_stream(r, src, 4)
    await read(r, src, A)
    await age(r, src, A, ids[0], ids[2])
    await steal(r, src, A, ids[2])  # delivered twice already
    await age(r, src, A, ids[2])
    cursor, claimed = await scripts.reclaim(
        keys=[src, f"{src}:clock"], args=[GROUP, B, 50_000, "0-0", 100, 60_000]
    )
    assert cursor == b"0-0"
    got = {c[0].decode(): (as_dict(c[1]), int(c[2])) for c in claimed}
    assert got == {ids[0]: ({b"n": b"0"}, 2), ids[2]: ({b"n": b"2"}, 3)}
    after = await pending(r, src)
    assert after[ids[0]][:2] == (B, 2)
    assert after[ids[2]][:2] == (B, 3)
    assert after[ids[1]][:2] == (A, 1)  # fresh leases are left alone
    assert after[ids[3]][:2] == (A, 1)


async def test_reclaim_loops_by_cursor(r: Redis, scripts: Scripts, keys: Keys) -> None:
    src = keys.stream("route")
    ids = await make_stream(r, src, 10)
    await read(r, src, A)
    await age(r, src, A, *ids)
    cursor, seen, calls = "0-0", [], 0
    while True:
        nxt, claimed = await scripts.reclaim(
            keys=[src, f"{src}:clock"], args=[GROUP, B, 50_000, cursor, 3, 60_000]
        )
        calls += 1
        assert len(claimed) <= 3
        seen += [c[0].decode() for c in claimed]
        cursor = nxt.decode()
        if cursor == "0-0":
            break
        assert calls < 10
    assert seen == ids
    assert calls >= 4
    assert {owner for owner, _, _ in (await pending(r, src)).values()} == {B}


async def test_reclaim_drops_entry_deleted_while_pending(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    src = keys.stream("route")
    ids = await make_stream(r, src, 3)
    await read(r, src, A)
    await age(r, src, A, *ids)
    await r.xdel(src, ids[1])
    _, claimed = await scripts.reclaim(
        keys=[src, f"{src}:clock"], args=[GROUP, B, 50_000, "0-0", 100, 60_000]
    )
    assert [c[0].decode() for c in claimed] == [ids[0], ids[2]]
    assert all(isinstance(c[1], list) and c[1] for c in claimed)
    assert set(await pending(r, src)) == {ids[0], ids[2]}
    _, again = await scripts.reclaim(
        keys=[src, f"{src}:clock"], args=[GROUP, A, 0, "0-0", 100, 60_000]
    )
    assert ids[1] not in {c[0].decode() for c in again}


# --- drain.lua -------------------------------------------------------------------------------


async def test_drain_returns_own_pending_with_incremented_count(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    src = keys.stream("route")
    ids = await make_stream(r, src, 5)
    mine = await read(r, src, A, count=3)
    theirs = await read(r, src, B)
    assert theirs == ids[3:]
    last, entries = await scripts.drain(keys=[src], args=[GROUP, A, "-", 100])
    assert last.decode() == mine[-1]
    got = [(e[0].decode(), as_dict(e[1]), int(e[2])) for e in entries]
    assert got == [(eid, {b"n": str(i).encode()}, 2) for i, eid in enumerate(mine)]
    after = await pending(r, src)
    assert {eid: after[eid][:2] for eid in mine} == dict.fromkeys(mine, (A, 2))
    assert {eid: after[eid][:2] for eid in theirs} == dict.fromkeys(theirs, (B, 1))


async def test_drain_pages_with_exclusive_start(r: Redis, scripts: Scripts, keys: Keys) -> None:
    src = keys.stream("route")
    ids = await make_stream(r, src, 5)
    await read(r, src, A)
    start, seen, pages = "-", [], 0
    while True:
        last, entries = await scripts.drain(keys=[src], args=[GROUP, A, start, 2])
        pages += 1
        assert len(entries) <= 2
        seen += [e[0].decode() for e in entries]
        if not last:
            break
        start = "(" + last.decode()
        assert pages < 10
    assert seen == ids  # each exactly once: the start id is exclusive
    assert pages == 4  # 2 + 2 + 1, then an empty page with last ''
    assert {d for _, d, _ in (await pending(r, src)).values()} == {2}


async def test_drain_skips_entry_deleted_while_pending(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    src = keys.stream("route")
    ids = await make_stream(r, src, 3)
    await read(r, src, A)
    await r.xdel(src, ids[0])
    last, entries = await scripts.drain(keys=[src], args=[GROUP, A, "-", 100])
    assert last.decode() == ids[2]
    assert [e[0].decode() for e in entries] == ids[1:]
    assert set(await pending(r, src)) == set(ids[1:])


# --- promote.lua -----------------------------------------------------------------------------


async def test_promote_moves_only_due_entries(r: Redis, scripts: Scripts, keys: Keys) -> None:
    stream = keys.stream("call", "haiku")
    delayed = keys.delayed(stream)
    now = await server_ms(r)
    await r.zadd(delayed, {b"due-1": now - 5000, b"due-2": now - 1, b"later": now + 30_000})
    moved, wait = await scripts.promote(keys=[delayed, stream], args=["_env", "_id", 100])
    assert moved == 2
    assert 25_000 <= wait <= 30_000
    assert [f for _, f in await r.xrange(stream)] == [{b"_env": b"due-1"}, {b"_env": b"due-2"}]
    assert await r.zrange(delayed, 0, -1) == [b"later"]
    moved, wait = await scripts.promote(keys=[delayed, stream], args=["_env", "_id", 100])
    assert moved == 0
    assert await r.xlen(stream) == 2
    await r.zrem(delayed, b"later")
    assert await scripts.promote(keys=[delayed, stream], args=["_env", "_id", 100]) == [0, -1]


async def test_promote_respects_the_batch_limit(r: Redis, scripts: Scripts, keys: Keys) -> None:
    stream = keys.stream("route")
    delayed = keys.delayed(stream)
    now = await server_ms(r)
    await r.zadd(delayed, {f"m{i}".encode(): now - 1000 + i for i in range(10)})
    moved, wait = await scripts.promote(keys=[delayed, stream], args=["_env", "_id", 4])
    assert moved == 4
    assert wait == 0  # more are due already
    assert [f[b"_env"] for _, f in await r.xrange(stream)] == [b"m0", b"m1", b"m2", b"m3"]


async def test_promote_concurrently_moves_each_entry_once(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    stream = keys.stream("call", "haiku")
    delayed = keys.delayed(stream)
    now = await server_ms(r)
    members = {f"env-{i:04d}".encode(): now - 10_000 + i for i in range(1000)}
    await r.zadd(delayed, members)
    moved_by: list[int] = []

    async def mover() -> None:
        total = 0
        for _ in range(200):  # bounded: a mover that never empties the set must fail, not hang
            moved, _ = await scripts.promote(keys=[delayed, stream], args=["_env", "_id", 37])
            if moved == 0:
                break
            total += moved
        moved_by.append(total)

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(mover)
    assert sum(moved_by) == 1000
    assert await r.xlen(stream) == 1000
    assert await r.zcard(delayed) == 0
    values = [f[b"_env"] for _, f in await r.xrange(stream, count=2000)]
    assert sorted(values) == sorted(members)


# --- hold.lua --------------------------------------------------------------------------------


async def test_hold_first_taker_wins(r: Redis, scripts: Scripts, keys: Keys) -> None:
    name = keys.worker("host-1")
    assert await scripts.hold(keys=[name], args=["token-a", 200]) == 1
    assert await scripts.hold(keys=[name], args=["token-b", 10_000]) == 0
    assert await r.get(name) == b"token-a"
    assert await scripts.hold(keys=[name], args=["token-a", 10_000]) == 1  # renew
    assert 5_000 < await r.pttl(name) <= 10_000
    assert await scripts.hold(keys=[name], args=["token-b", 10_000]) == 0
    assert await r.get(name) == b"token-a"
    assert 5_000 < await r.pttl(name) <= 10_000  # a refused taker does not touch the TTL


async def test_hold_is_free_again_after_expiry(r: Redis, scripts: Scripts, keys: Keys) -> None:
    name = keys.worker("host-2")
    assert await scripts.hold(keys=[name], args=["token-a", 50]) == 1
    await anyio.sleep(0.15)
    assert await scripts.hold(keys=[name], args=["token-b", 10_000]) == 1
    assert await r.get(name) == b"token-b"
    assert await scripts.hold(keys=[name], args=["token-a", 10_000]) == 0


async def test_promote_gives_an_entry_its_task_id_field(
    r: Redis, scripts: Scripts, keys: Keys
) -> None:
    """A member written as `<n>:<task id><envelope>` goes back as the two fields of an entry
    between stages, so its task id is readable even if the envelope is not."""
    stream = keys.stream("route")
    delayed = keys.delayed(stream)
    now = await server_ms(r)
    await r.zadd(delayed, {b"7:job:1:2\x99env:bytes": now - 1, b"2:\xc3\xa9\x00raw": now - 1})
    moved, _ = await scripts.promote(keys=[delayed, stream], args=["_env", "_id", 10])
    assert moved == 2
    got = sorted(tuple(sorted(f.items())) for _, f in await r.xrange(stream))
    assert got == sorted(
        [
            ((b"_env", b"\x99env:bytes"), (b"_id", b"job:1:2")),
            ((b"_env", b"\x00raw"), (b"_id", "é".encode())),
        ]
    )


async def test_flight_join_renews_a_leader_only_while_nobody_took_over_or_answered(
    r: Redis, keys: Keys
) -> None:
    """A leader renews (and, before its call goes out, confirms) its lead by asking as a
    follower since it began to lead: it keeps a live lease, retakes a lapsed one nobody
    took, and has lost the lead once another task leads or an answer was published since."""
    join = load_claude_script(r, "flight_join")
    flight, published = keys.flight("h", "m:64"), keys.flight_answer("h", "m:64")
    flight_keys = [flight, published, keys.cache("h")]

    async def ask(task: str, since: object = "") -> list[object]:
        return list(await join(keys=flight_keys, args=[task, 100, since, "1"]))

    led = await ask("a")
    assert led[0] == 2 and isinstance(led[1], int), "the lead, and since when (server µs)"
    since = led[1]
    assert (await ask("a", since))[0] == 2 and 50 < await r.pttl(flight) <= 100, "renewed"
    await anyio.sleep(0.15)  # lapsed, nobody took it: retaken
    assert (await ask("a", since))[0] == 2 and await r.get(flight) == b"a"
    await anyio.sleep(0.15)
    assert (await ask("b"))[0] == 2, "lapsed again: b leads"
    assert (await ask("a", since))[0] == 0, "a lost the lead"
    await r.delete(flight)  # b answered and let go
    await r.hset(published, mapping={"at": since + 1, "answer": b"b's"})
    assert await ask("a", since) == [1, b"b's"], "a takes b's answer rather than call"
    assert not await r.exists(flight)
