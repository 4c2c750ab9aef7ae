"""Counting what happened to every task at the end of a run (every chaos test ends so)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import redis

from pipeline.runtime.keys import Keys


@dataclass
class Tally:
    done: Counter[str]  # completion events per task id
    dlq: Counter[str]  # DLQ entries per task id
    statuses: dict[str, str]  # result status per task id
    runs: dict[str, Counter[str]]  # handler runs per stage per task id

    def assert_exactly_once(self, task_ids: list[str]) -> None:
        """Every task: exactly one completion event; failed ones exactly one DLQ entry."""
        missing = [t for t in task_ids if self.done[t] == 0]
        assert not missing, f"{len(missing)} tasks never finished, e.g. {missing[:5]}"
        dup = {t: n for t, n in self.done.items() if n > 1}
        assert not dup, f"tasks with more than one completion: {dup}"
        for t in task_ids:
            want = 1 if self.statuses.get(t) == "failed" else 0
            assert self.dlq[t] == want, (
                f"task {t}: status {self.statuses.get(t)}, dlq {self.dlq[t]}"
            )

    def completed(self) -> int:
        return sum(1 for s in self.statuses.values() if s == "completed")


def tally(client: redis.Redis, prefix: str, stages: tuple[str, ...] = ()) -> Tally:
    keys = Keys(prefix)
    done: Counter[str] = Counter()
    for _id, fields in client.xrange(keys.done):
        done[fields[b"id"].decode()] += 1
    dlq: Counter[str] = Counter()
    for _id, fields in client.xrange(keys.dlq):
        dlq[fields[b"task_id"].decode()] += 1
    statuses = {}
    for task_id in done:
        status = client.hget(keys.result(task_id), "status")
        statuses[task_id] = status.decode() if status else "missing"
    runs = {}
    for stage in stages:
        raw = client.hgetall(keys.app_key(f"runs:{stage}"))
        runs[stage] = Counter({k.decode(): int(v) for k, v in raw.items()})
    return Tally(done, dlq, statuses, runs)


def assert_drained(client: redis.Redis, prefix: str, streams: tuple[str, ...]) -> None:
    """Every stage stream empty, every pending list empty, no delayed retries left."""
    keys = Keys(prefix)
    for name in streams:
        stream = keys.stream(name)
        assert client.xlen(stream) == 0, f"{stream} still holds {client.xlen(stream)} entries"
        for group in client.xinfo_groups(stream):
            assert group["pending"] == 0, f"{stream}/{group['name']} has pending entries"
        assert client.zcard(keys.delayed(stream)) == 0, f"{stream} has delayed entries"
