"""The producer's side: submit tasks to the ingress, read results, wait for them.

Guarantee 8 starts here: a bad request is refused with a message that says what is wrong
(`InvalidTask`) before anything reaches Redis, and a full ingress refuses new work
(`Backpressure`) instead of growing without bound.

A submit is all or nothing, and safe to send again. Every task leaves with an `id` (the
caller's, else a fresh `uuid4().hex`), which the pipeline treats as an idempotency key, and
each `submit`/`submit_many` call is one MULTI/EXEC: Redis adds all of its tasks or none. When
a call fails, `SubmitFailed` carries the exact tasks it sent, ids included: sending them again
adds nothing twice, whether or not the first try landed (a copy that did is dropped by the
cache-check stage, with no second call and no second result).

Waiting does not poll. One background reader per `Client` follows the `done` stream with
`XREAD BLOCK` and wakes the waiters of the task ids it sees, so thousands of concurrent
`result(id, wait=…)` calls share one connection; the hash reads they then make are batched
into pipelined round trips on one more.

The package's modules: `client` (the `Client`), `fields` (a task's wire fields, checked with
no Redis), `errors` (`SubmitFailed`) and `waiting` (the done-stream reader and the batched
hash reads behind `result(…, wait=…)`).
"""

from __future__ import annotations

from pipeline.client.client import BATCH_SIZE, Client
from pipeline.client.errors import SubmitFailed
from pipeline.client.fields import WIRE_FIELDS, task_fields, with_id

# The errors the client raises, so `from pipeline.client import InvalidTask` keeps working.
from pipeline.runtime.errors import Backpressure, ConfigError, InvalidTask, RedisUnavailable

__all__ = [
    "BATCH_SIZE",
    "WIRE_FIELDS",
    "Backpressure",
    "Client",
    "ConfigError",
    "InvalidTask",
    "RedisUnavailable",
    "SubmitFailed",
    "task_fields",
    "with_id",
]
