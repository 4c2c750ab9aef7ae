"""Key names: one module names every key; a partition's keys share one Cluster slot."""

from __future__ import annotations

import fnmatch

import pytest
from redis.crc import key_slot

from pipeline.runtime.keys import Keys


def slot(key: str) -> int:
    return key_slot(key.encode())


def all_keys(keys: Keys) -> list[str]:
    return [
        keys.ingress,
        keys.stream("route"),
        keys.stream("call", "haiku"),
        keys.delayed(keys.stream("route")),
        keys.dlq,
        keys.done,
        keys.result("task-1"),
        keys.pause("router"),
        keys.worker("host-1"),
        keys.app_key("seen"),
    ]


@pytest.mark.parametrize("prefix", ["pipeline", "acme.prod-2"])
def test_key_names_unpartitioned(prefix: str) -> None:
    k = Keys(prefix)
    assert k.prefix == prefix
    assert k.partition is None
    assert k.ingress == f"{prefix}:tasks"
    assert k.stream("tasks") == f"{prefix}:tasks"
    assert k.stream("route") == f"{prefix}:route"
    assert k.stream("call", "haiku") == f"{prefix}:call:haiku"
    assert k.stream("store") == f"{prefix}:store"
    assert k.delayed(f"{prefix}:route") == f"{prefix}:route:delayed"
    assert k.dlq == f"{prefix}:dlq"
    assert k.done == f"{prefix}:done"
    assert k.result("abc") == f"{prefix}:result:abc"
    assert k.result("1700000000000-0") == f"{prefix}:result:1700000000000-0"
    assert k.pause("claude-call") == f"{prefix}:pause:claude-call"
    assert k.worker("host-1") == f"{prefix}:worker:host-1"
    assert k.app_key("seen") == f"{prefix}:app:seen"
    assert k.pattern() == f"{prefix}:*"


def test_default_prefix_matches_the_wire_format() -> None:
    assert Keys("pipeline").ingress == "pipeline:tasks"


@pytest.mark.parametrize("prefix", ["pipeline", "acme.prod-2"])
def test_every_key_matches_the_prefix_pattern_and_no_other(prefix: str) -> None:
    for keys in (Keys(prefix), Keys(prefix, 3, partitions=4)):
        for key in all_keys(keys):
            assert fnmatch.fnmatchcase(key, Keys(prefix).pattern()), key
            assert not fnmatch.fnmatchcase(key, Keys(prefix + "x").pattern()), key


def test_unpartitioned_keys_carry_no_hash_tag() -> None:
    for key in all_keys(Keys("pipeline")):
        assert "{" not in key and "}" not in key, key


def test_partitioned_key_names() -> None:
    k = Keys("pipeline", 3, partitions=16)
    assert k.partition == 3
    assert k.stream("tasks") == "pipeline:{p3}:tasks"
    assert k.stream("route") == "pipeline:{p3}:route"
    assert k.stream("call", "haiku") == "pipeline:{p3}:call:haiku"
    assert k.delayed(k.stream("route")) == "pipeline:{p3}:route:delayed"
    assert k.dlq == "pipeline:{p3}:dlq"
    assert k.landed == "pipeline:{p3}:done"
    assert k.app_key("seen") == "pipeline:{p3}:app:seen"
    assert Keys("pipeline", 0, partitions=4).stream("route") == "pipeline:{p0}:route"
    # What producers touch does not move.
    assert k.ingress == "pipeline:tasks"
    assert k.result("t1") == "pipeline:result:t1"
    assert k.done == "pipeline:done"
    assert k.pause("router") == "pipeline:pause:router"


def test_a_task_belongs_to_the_partition_of_its_ids_cluster_slot() -> None:
    """The documented one-line rule: CLUSTER KEYSLOT <id> mod N."""
    k = Keys("pipeline", partitions=16)
    for task_id in ("order-42", "t1", "1700000000000-0", "{user7}:a"):
        p = k.partition_of(task_id)
        assert p == key_slot(task_id.encode()) % 16
        assert k.task(task_id) == f"pipeline:{{p{p}}}:task:{task_id}"
        assert k.landing(task_id) == f"pipeline:{{p{p}}}:result:{task_id}"
        assert k.ledger("2026-12-03", task_id) == f"pipeline:{{p{p}}}:ledger:2026-12-03"
        # The same from any partition's keys: a record is always found where its id says.
        assert Keys("pipeline", 5, partitions=16).task(task_id) == k.task(task_id)
    assert Keys("pipeline").partition_of("t1") is None
    assert Keys("pipeline").landing("t1") == "pipeline:result:t1"
    assert [p.partition for p in k.each_partition()] == list(range(16))
    assert Keys("pipeline").each_partition()[0].partition is None
    with pytest.raises(ValueError, match="partition 16 of 16"):
        Keys("pipeline", 16, partitions=16)


@pytest.mark.parametrize("partition", [0, 3, 15])
def test_partition_keys_share_one_hash_tag_and_slot(partition: int) -> None:
    k = Keys("acme", partition, partitions=16)
    tag = f"{{p{partition}}}"
    partitioned = [
        k.stream("tasks"),
        k.stream("route"),
        k.stream("call", "haiku"),
        k.stream("store"),
        k.delayed(k.stream("route")),
        k.delayed(k.stream("call", "sonnet")),
        k.dlq,
        k.dlq_bytes,
        k.landed,
        k.moved("1-0"),
        k.app_key("seen"),
    ]
    for key in partitioned:
        assert key.count("{") == 1 and key.count("}") == 1, key
        assert tag in key, key
    assert {slot(key) for key in partitioned} == {slot(tag[1:-1])}


def test_delayed_set_shares_its_streams_slot() -> None:
    # promote.lua and handoff.lua's ZADD touch a stream and its delayed set in one call.
    for keys in (Keys("pipeline", 7, partitions=8), Keys("acme", 0, partitions=8)):
        for stream in (keys.stream("route"), keys.stream("call", "opus"), keys.stream("tasks")):
            assert slot(keys.delayed(stream)) == slot(stream)


def test_partitions_spread_over_distinct_slots() -> None:
    slots = {slot(Keys("pipeline", p, partitions=16).stream("route")) for p in range(16)}
    assert len(slots) == 16


def test_partition_handoff_keys_share_one_slot() -> None:
    """DESIGN (Scale): each atomic hand-off stays on one slot when streams are partitioned.

    The last stage's hand-off (handoff.lua RESULT action, runtime.py) writes the result hash and
    the `done` event in the same script call as the ack of its partitioned input stream; on
    Redis Cluster all three must hash to one slot or the script fails with CROSSSLOT.
    """
    k = Keys("pipeline", partitions=16)
    for task_id in ("task-1", "order-42", "x" * 200):
        part = k.for_task(task_id)
        store = part.stream("store")
        assert slot(part.landing(task_id)) == slot(store)
        assert slot(part.landed) == slot(store)
        assert slot(part.task(task_id)) == slot(store)
        assert slot(part.dlq) == slot(store)
        assert slot(part.ledger("2026-12-03", task_id)) == slot(store)
