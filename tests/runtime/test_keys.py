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
    for keys in (Keys(prefix), Keys(prefix, 3)):
        for key in all_keys(keys):
            assert fnmatch.fnmatchcase(key, Keys(prefix).pattern()), key
            assert not fnmatch.fnmatchcase(key, Keys(prefix + "x").pattern()), key


def test_unpartitioned_keys_carry_no_hash_tag() -> None:
    for key in all_keys(Keys("pipeline")):
        assert "{" not in key and "}" not in key, key


def test_partitioned_key_names() -> None:
    k = Keys("pipeline", 3)
    assert k.partition == 3
    assert k.ingress == "pipeline:{p3}:tasks"
    assert k.stream("route") == "pipeline:{p3}:route"
    assert k.stream("call", "haiku") == "pipeline:{p3}:call:haiku"
    assert k.delayed(k.stream("route")) == "pipeline:{p3}:route:delayed"
    assert k.dlq == "pipeline:{p3}:dlq"
    assert k.pause("router") == "pipeline:{p3}:pause:router"
    assert k.app_key("seen") == "pipeline:{p3}:app:seen"
    assert Keys("pipeline", 0).stream("route") == "pipeline:{p0}:route"


@pytest.mark.parametrize("partition", [0, 3, 15])
def test_partition_keys_share_one_hash_tag_and_slot(partition: int) -> None:
    k = Keys("acme", partition)
    tag = f"{{p{partition}}}"
    partitioned = [
        k.ingress,
        k.stream("route"),
        k.stream("call", "haiku"),
        k.stream("store"),
        k.delayed(k.stream("route")),
        k.delayed(k.stream("call", "sonnet")),
        k.dlq,
        k.pause("router"),
        k.app_key("seen"),
    ]
    for key in partitioned:
        assert key.count("{") == 1 and key.count("}") == 1, key
        assert tag in key, key
    assert {slot(key) for key in partitioned} == {slot(tag[1:-1])}


def test_delayed_set_shares_its_streams_slot() -> None:
    # promote.lua and handoff.lua's ZADD touch a stream and its delayed set in one call.
    for keys in (Keys("pipeline", 7), Keys("acme", 0)):
        for stream in (keys.stream("route"), keys.stream("call", "opus"), keys.ingress):
            assert slot(keys.delayed(stream)) == slot(stream)


def test_partitions_spread_over_distinct_slots() -> None:
    slots = {slot(Keys("pipeline", p).stream("route")) for p in range(16)}
    assert len(slots) == 16


def test_partition_handoff_keys_share_one_slot() -> None:
    """DESIGN (Scale): each atomic hand-off stays on one slot when streams are partitioned.

    The last stage's hand-off (handoff.lua RESULT action, runtime.py) writes the result hash and
    the `done` event in the same script call as the ack of its partitioned input stream; on
    Redis Cluster all three must hash to one slot or the script fails with CROSSSLOT.
    """
    k = Keys("pipeline", 3)
    store = k.stream("store")
    assert slot(k.result("task-1")) == slot(store)
    assert slot(k.done) == slot(store)
