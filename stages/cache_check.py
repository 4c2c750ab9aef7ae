"""cache-check: the first stage. Validates a producer's task and answers it from the cache.

Reads the ingress (`<prefix>:tasks`). Bad input raises `InvalidTask`, which the runtime
dead-letters with the reason and answers with a `failed` result (guarantees 3 and 8). A
cached answer goes straight to the store, skipping the router and the paid call (cost
control); anything else goes on to the router.
"""

from __future__ import annotations

import logging

import msgspec

from pipeline import Forward, Handler, Message, Outcome, Services, Stage
from pipeline.request import parse_request
from pipeline.task import Answer, Request

log = logging.getLogger(__name__)


async def build(services: Services) -> Handler:
    """The handler, with this worker's settings and response cache."""
    settings, cache = services.settings, services.cache

    async def check(msg: Message) -> Outcome:
        request = parse_request(msg.fields, settings)
        if request.cache and settings.cache.ttl_for(request.type):
            hit = await cache.get(request.request_hash)
            if hit is not None and (answer := _cached_answer(hit, request)) is not None:
                return Forward("store", answer)
        return Forward("router", request)

    return check


def _cached_answer(raw: bytes, request: Request) -> Answer | None:
    """The cached answer, as this task's own (its request, no calls made, nothing paid)."""
    try:
        cached = msgspec.msgpack.decode(raw, type=Answer)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("unreadable cache entry %s (treated as a miss): %s", request.request_hash, exc)
        return None
    return msgspec.structs.replace(cached, request=request, cached=True, attempts=0, call_ms=0)


stage = Stage("cache-check", "tasks", build=build)
