"""`pipeline batches list|show|cancel` and the batch lane's lines in `pipeline status`, on
batch-lane state as the lane writes it."""

from __future__ import annotations

import json
import re
import time

import redis

from pipeline.runtime.keys import Keys
from tests.cli.test_cli import cli, one_error_line

BATCH_ID = "msgbatch_01HkcTjaV5uDC8jWR4ZsDV8d"  # as long as the API's ids


def lane_state(rclient: redis.Redis, keys: Keys) -> None:
    now = int(time.time() * 1000)
    rclient.zadd(keys.batch_queue("haiku"), {"q1": now - 90_000, "q2": now})
    batch = {"state": "submitted", "family": "haiku", "id": BATCH_ID, "requests": 3,
             "formed_ms": now - 3_600_000}  # fmt: skip
    rclient.hset(keys.batch("tok1"), mapping=batch)  # type: ignore[arg-type]
    rclient.sadd(keys.batch_unanswered("tok1"), "a", "b")
    rclient.sadd(keys.batches("haiku"), "tok1")


def test_batches_list_show_and_status(
    env: dict[str, str], prefix: str, rclient: redis.Redis
) -> None:
    empty = cli(env, "batches", "list")
    assert empty.returncode == 0 and "The batch lane is empty." in empty.stdout
    lane_state(rclient, Keys(prefix))
    shown = cli({**env, "COLUMNS": "80"}, "batches", "list")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any("(queued)" in line and "1m 3" in line for line in lines), shown.stdout
    assert any(BATCH_ID in line and "submitted" in line for line in lines)
    data = json.loads(cli(env, "batches", "list", "--json").stdout)
    haiku = next(lane for lane in data if lane["family"] == "haiku")
    assert haiku["queued"] == 2 and haiku["batches"][0]["unanswered"] == 2
    one = json.loads(cli(env, "batches", "show", BATCH_ID, "--json").stdout)
    assert (one["token"], one["requests"], one["state"]) == ("tok1", 3, "submitted")
    by_token = json.loads(cli(env, "batches", "show", "tok1", "--json").stdout)
    assert {**by_token, "age_s": 0, "oldest_s": 0} == {**one, "age_s": 0, "oldest_s": 0}
    missing = one_error_line(cli(env, "batches", "show", "nope"), code=1)
    assert "no open batch 'nope'" in missing
    status = cli(env, "status")
    line = r"batch lane haiku: 2 queued \(oldest 1m 3\ds\), 1 batches open, 2 to hand on"
    assert re.search(line, " ".join(status.stdout.split())), status.stdout
    no_tty = one_error_line(cli(env, "batches", "cancel", "tok1"), code=2)
    assert "pass --yes" in no_tty
