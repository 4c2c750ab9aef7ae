"""Consumer groups are made where they are first needed, at `0` (nothing in the stream is
skipped), and made again when Redis lost them."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from pipeline.runtime.redis_conn import Availability

__all__ = ["ensure_group"]


async def ensure_group(redis: Redis, available: Availability, stream: str, group: str) -> bool:
    """Create `stream`'s consumer `group` (and the stream) unless it exists, waiting out an
    outage; True if it had to be created."""

    async def create() -> bool:
        try:
            await redis.xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return False
        return True

    return await available.call(create)
