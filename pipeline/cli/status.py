"""`pipeline status`'s picture: the runtime's queue numbers plus the rate limiter's state
per (API key, model family), read together."""

from __future__ import annotations

from redis.asyncio import Redis

from pipeline.claude.batch_status import LaneView, lane_views
from pipeline.claude.ratelimit import LimitState, limiter_state
from pipeline.claude.settings import RateLimitSettings
from pipeline.runtime.keys import Keys
from pipeline.runtime.stage import App
from pipeline.runtime.status import Status, gather_status

__all__ = ["PipelineStatus", "gather"]

#: The stage whose lanes hold batches (stages/claude_batch.py).
BATCH_STAGE = "claude-batch"


class PipelineStatus(Status, frozen=True, kw_only=True):
    """The runtime's `Status` and the limits the limiter has seen (learned or configured)."""

    limits: list[LimitState] = []
    batch_lanes: list[LaneView] = []  # the batch lane's families (when the app has one)


async def gather(
    redis: Redis,
    keys: Keys,
    app: App,
    ratelimit: RateLimitSettings | None = None,
    *,
    durability: bool = False,
) -> PipelineStatus:
    """The queues in one round trip, then the limiter's state (`ratelimit`: limits that live
    only in config, else learned ones only)."""
    status = await gather_status(redis, keys, app, durability=durability)
    limits = await limiter_state(redis, keys, ratelimit)
    batch_stage = next((s for s in app.stages if s.name == BATCH_STAGE), None)
    lanes = await lane_views(redis, keys, batch_stage.lanes) if batch_stage else []
    fields = {f: getattr(status, f) for f in status.__struct_fields__}
    return PipelineStatus(**fields, limits=limits, batch_lanes=lanes)
