"""The "Poison is contained" guarantee at the edges of size: every failure is written under the
task's own id, a task that could not travel the pipeline is refused before anything is paid, and
a dead letter keeps its entry whole so that a replay sends exactly what failed.

Real stages as worker subprocesses, a real Redis, the fake Anthropic API.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
import redis

from pipeline.fake_claude import FakeClaudeServer
from pipeline.runtime.keys import Keys
from pipeline.runtime.wire import WIRE_VERSION, Envelope, internal_entry
from tests.conftest import StartFake
from tests.helpers.workers import Workers, wait_until

pytestmark = pytest.mark.chaos
BIG = 100_025  # characters: well over what a letter shows of a field (16 KiB)


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class Rig:
    def __init__(self, client: redis.Redis, keys: Keys, fake: FakeClaudeServer) -> None:
        self.client, self.keys, self.fake = client, keys, fake

    def result(self, task_id: str, timeout: float = 30) -> dict[str, str]:
        key = self.keys.result(task_id)
        wait_until(lambda: self.client.exists(key), timeout, what=f"a result for {task_id[:40]}")
        raw = cast("dict[bytes, bytes]", self.client.hgetall(key))
        return {_text(k): _text(v) for k, v in raw.items()}

    def letters(self) -> list[dict[str, str]]:
        rows = cast("list[tuple[bytes, dict[bytes, bytes]]]", self.client.xrange(self.keys.dlq))
        return [
            {_text(k): _text(v) for k, v in f.items() if k != b"entry"} | {"dlq_id": _text(i)}
            for i, f in rows
        ]

    def calls(self) -> int:
        return int(self.fake.stats()["requests_total"])


@pytest.fixture
def rig(
    fast_env: dict[str, str], start_fake: StartFake, rclient: redis.Redis, tmp_path: Path
) -> Iterator[Rig]:
    fake = start_fake(latency_ms=50)
    env = {
        **fast_env,
        "ANTHROPIC_BASE_URL": fake.base_url,
        "ANTHROPIC_API_KEY": "good-key",
        "PIPELINE_RETRY__MAX_ATTEMPTS": "2",
        "PIPELINE_INGRESS__MAX_PROMPT_BYTES": str(8 * 1024 * 1024),
    }
    workers = Workers(env, tmp_path, app="stages:app")
    workers.start()
    yield Rig(rclient, Keys(fast_env["PIPELINE_PREFIX"]), fake)
    workers.stop_all()


def _replay(rig: Rig, dlq_id: str, env: dict[str, str]) -> None:
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "dlq", "replay", dlq_id, "--yes"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("kind", ["prompt", "messages"])
def test_a_large_task_dead_lettered_then_replayed_is_answered_from_its_full_text(
    rig: Rig, fast_env: dict[str, str], kind: str
) -> None:
    """Today's bug: the letter cut the prompt to 64 KiB and replay sent the cut copy (16,392
    input tokens for a 100,025-character prompt; a 100 KB `messages` replayed as bad JSON)."""
    text = "lorem ipsum " * (BIG // 12) + "x" * (BIG % 12)
    assert len(text) == BIG
    value = text if kind == "prompt" else json.dumps([{"role": "user", "content": text}])
    rig.fake.update_config(server_error_rate=1.0)  # every call fails: two attempts
    rig.client.xadd(rig.keys.ingress, {"id": f"big-{kind}", kind: value, "cache": "false"})
    failed = rig.result(f"big-{kind}")
    assert failed["status"] == "failed" and "gave up after 2 attempts" in failed["error"]
    (letter,) = rig.letters()
    assert letter["task_id"] == f"big-{kind}" and letter["stage"] == "claude-call"
    rig.fake.update_config(server_error_rate=0.0)
    rig.fake.reset()
    _replay(rig, letter["dlq_id"], fast_env)
    wait_until(
        lambda: rig.client.hget(rig.keys.result(f"big-{kind}"), "status") == b"completed",
        30,
        what="the replayed task's answer",
    )
    answered = rig.result(f"big-{kind}")
    # The fake counts ceil(bytes / 4) tokens: the whole text was sent, not a cut copy.
    assert int(answered["input_tokens"]) >= BIG // 4
    assert rig.calls() == 1 and rig.letters() == []


def test_a_task_that_could_not_travel_is_refused_before_any_call(rig: Rig) -> None:
    """Its entries between stages would not fit `max_entry_bytes` (4 MiB): a JSON float takes
    9 bytes in msgpack. Today such a task was paid for, then failed at the store under the
    store entry's id, and its producer waited forever."""
    floats = ",".join(["0.5"] * 700_000)  # 2.8 MB of JSON, ~6.3 MB once parsed
    block = f'{{"type": "document", "source": {{"type": "x", "data": [{floats}]}}}}'
    messages = f'[{{"role": "user", "content": [{block}]}}]'
    rig.client.xadd(rig.keys.ingress, {"id": "too-big", "messages": messages})
    failed = rig.result("too-big")
    assert failed["status"] == "failed"
    assert "over the 4,194,304-byte entry limit" in failed["error"], failed["error"]
    (letter,) = rig.letters()
    assert (letter["task_id"], letter["stage"]) == ("too-big", "cache-check")
    assert rig.calls() == 0


def test_a_large_task_that_fits_travels_and_its_store_entry_stays_small(rig: Rig) -> None:
    """3.3 MB of prompt: the store's entry carries the answer without the prompt (today it
    carried the producer's fields, the request and the answer: 4.2 MB, over the limit)."""
    rig.client.xadd(rig.keys.ingress, {"id": "large", "prompt": "y" * 3_300_000})
    done = rig.result("large", timeout=60)
    assert done["status"] == "completed", done["error"]
    assert rig.calls() == 1


def test_an_over_long_id_is_refused_whole_under_the_whole_id(rig: Rig) -> None:
    long_id = "i" * 300
    rig.client.xadd(rig.keys.ingress, {"id": long_id, "prompt": "hello"})
    failed = rig.result(long_id)
    assert failed["error"].endswith("id: 300 characters, over the 256-character limit")
    assert not rig.client.exists(rig.keys.result(long_id[:256]))
    assert [letter["task_id"] for letter in rig.letters()] == [long_id]
    assert rig.calls() == 0


@pytest.mark.parametrize("stream", ["route", "call:haiku", "store"])
def test_an_entry_from_another_wire_version_fails_under_its_task_id(rig: Rig, stream: str) -> None:
    """During a rolling upgrade a stage may meet an envelope it cannot read: the failure goes
    under the task's id (the entry's `_id` field), not the stream entry's id."""
    env = Envelope(
        v=WIRE_VERSION + 1, task_id=f"v-{stream}", fields={}, attempt=1, origin_ms=0,
        enqueued_ms=0,
    )  # fmt: skip
    fields = cast("dict[Any, Any]", internal_entry(env))
    rig.client.xadd(rig.keys.stream(*stream.split(":")), fields)
    failed = rig.result(f"v-{stream}")
    assert "unsupported wire version" in failed["error"]
    assert [letter["task_id"] for letter in rig.letters()] == [f"v-{stream}"]


def test_a_letter_shows_a_cut_copy_and_keeps_the_whole_entry(rig: Rig) -> None:
    big = "z" * BIG
    rig.client.xadd(rig.keys.ingress, {"id": "bad", "prompt": big, "temperature": "hot"})
    rig.result("bad")
    ((_id, raw),) = cast("list[tuple[bytes, dict[bytes, bytes]]]", rig.client.xrange(rig.keys.dlq))
    shown = json.loads(raw[b"fields"])["prompt"]
    assert len(shown) < 17 * 1024 and shown.endswith(f"…[cut: {BIG} chars in all]")
    kept = msgspec.msgpack.decode(raw[b"entry"])
    assert dict(zip(kept[::2], kept[1::2], strict=True))[b"prompt"] == big.encode()
