"""cache-check: the first stage. Validates a producer's task, admits its id, and answers it
from the cache.

Reads the ingress (`<prefix>:tasks`). Bad input raises `InvalidTask`, which the runtime
dead-letters with the reason and answers with a `failed` result (guarantees 3 and 8). A task
whose producer chose its `id` takes that id (an idempotency key, `pipeline.claude.task_record`):
another entry with the id of a live task is dropped if it asks the same, refused if it asks
something else. A task too large to travel every stage is refused here, before anything is
paid for. The task's route is decided here, once, as it is parsed (`parse_request`): the
decision keys the response cache. A cached answer goes straight to the store, skipping the
router and the paid call (cost control); anything else goes on to the router, carrying the
parsed request with its decision (which the router applies) and only the producer fields
later stages read (`CARRIED`), never the request twice.
"""

from __future__ import annotations

import logging

import msgspec

from pipeline import (
    Drop,
    Forward,
    Handler,
    InvalidTask,
    Message,
    Outcome,
    Reject,
    Services,
    Settings,
    Stage,
)
from pipeline.claude import Admission, Answer, Request, ResponseCache, TaskRecords, parse_request

log = logging.getLogger(__name__)

#: The producer fields that travel on with the parsed request: what the runtime and the
#: store still read (the result's TTL, metrics by type, a failed result's metadata).
CARRIED = ("id", "type", "ttl", "metadata")
#: An entry between stages holds the request re-encoded (msgpack: a JSON float may take
#: three times its text) plus an envelope; only entries this close to the limit are measured.
_MEASURE_ABOVE = 3


def _later_limit(settings: Settings) -> int:
    """The smallest `max_entry_bytes` of the stages a task goes through after this one."""
    return min(settings.runtime_for(s).max_entry_bytes for s in ("router", "claude-call"))


async def build(services: Services[Settings]) -> Handler:
    """The handler, with this worker's settings and response cache."""
    settings, cache = services.settings, services.shared(ResponseCache.for_services)
    records = TaskRecords.for_stage(services, "cache-check")
    limit = _later_limit(settings)

    async def check(msg: Message) -> Outcome:
        if msg.fields.get("id"):  # an id of the producer's: it may come twice
            admission = await records.admit(msg.task_id, msg.fields, msg.origin_id)
            if admission is Admission.DUPLICATE:
                return Drop("the same task under this id is already live or answered")
            if admission is Admission.CONFLICT:
                return Reject(
                    f"id {msg.task_id!r} is already in use by a different request "
                    "(ids are idempotency keys while the task or its result lives)"
                )
        request = parse_request(msg.fields, settings)
        carried = {name: msg.fields[name] for name in CARRIED if name in msg.fields}
        if msg.size * _MEASURE_ABOVE > limit:
            _check_size(request, carried, limit)
        if request.cache and settings.cache.ttl_for(request.type):
            hit = await cache.get(request.request_hash)
            if hit is not None and (answer := _cached_answer(hit, request)) is not None:
                return Forward("store", answer.to_store(), fields=carried)
        return Forward("router", request, fields=carried)

    return check


def _check_size(request: Request, carried: dict[str, str], limit: int) -> None:
    """Refuse a task whose entries between stages would not fit `limit` (it would fail after
    being paid for, at a later stage)."""
    size = len(msgspec.msgpack.encode(request)) + sum(map(len, carried.values())) + 1024
    if size > limit:
        raise InvalidTask(
            f"request: {size:,} bytes once parsed, over the {limit:,}-byte entry limit of "
            "the stages after cache-check (runtime.max_entry_bytes)"
        )


def _cached_answer(raw: bytes, request: Request) -> Answer | None:
    """The cached answer, as this task's own (its request, no calls made, nothing paid)."""
    try:
        cached = msgspec.msgpack.decode(raw, type=Answer)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("unreadable cache entry %s (treated as a miss): %s", request.request_hash, exc)
        return None
    return cached.served_for(request)


stage = Stage("cache-check", "tasks", build=build)
