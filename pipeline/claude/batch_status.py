"""What the batch lane holds, read for `pipeline status`, `pipeline batches` and the held-task
gauges: per family the tasks waiting for a batch, and each open batch's state, API id, size,
age and what it has yet to hand on."""

from __future__ import annotations

import time
from collections.abc import Iterable

import msgspec
from redis.asyncio import Redis

from pipeline.runtime.held import HeldStatus
from pipeline.runtime.keys import Keys
from pipeline.runtime.replies import as_str

__all__ = ["BatchView", "LaneView", "batch_view", "held_in_batches", "lane_views"]


class BatchView(msgspec.Struct, frozen=True, kw_only=True):
    """One open batch."""

    token: str
    family: str
    state: str  # forming (not yet sent, or its create not yet recorded), submitted, ended
    batch_id: str  # the API's id ("" until recorded)
    requests: int
    unanswered: int  # not yet handed on
    age_s: float  # since it was formed
    oldest_s: float = 0.0  # since its oldest task arrived


class LaneView(msgspec.Struct, frozen=True, kw_only=True):
    """One family's batch lane."""

    family: str
    queued: int  # shelved, in no batch yet
    oldest_queued_s: float | None
    batches: list[BatchView] = []

    def held(self, stage: str) -> HeldStatus:
        """The lane as the runtime counts held tasks (status, gauges)."""
        ages = [b.oldest_s for b in self.batches if b.unanswered]
        if self.oldest_queued_s is not None:
            ages.append(self.oldest_queued_s)
        return HeldStatus(
            stage=stage,
            lane=self.family,
            tasks={"queued": self.queued, "in_batch": sum(b.unanswered for b in self.batches)},
            oldest_s=max(ages, default=None),
        )


async def lane_views(redis: Redis, keys: Keys, families: Iterable[str]) -> list[LaneView]:
    """Every family's lane (families with nothing queued or open included)."""
    views = []
    now_ms = time.time() * 1000
    for family in families:
        queue = keys.batch_queue(family)
        queued = await redis.zcard(queue)
        oldest = await redis.zrange(queue, 0, 0, withscores=True) if queued else []
        tokens = sorted(as_str(t) for t in await redis.smembers(keys.batches(family)))
        batches = [b for b in [await batch_view(redis, keys, t) for t in tokens] if b]
        views.append(
            LaneView(
                family=family,
                queued=queued,
                oldest_queued_s=(now_ms - float(oldest[0][1])) / 1000 if oldest else None,
                batches=batches,
            )
        )
    return views


async def held_in_batches(stage: str, redis: Redis, keys: Keys, family: str | None) -> HeldStatus:
    """What the batch lane of `family` holds, as `stage`'s `Stage.held` reader says it (bind
    `stage` with `functools.partial`)."""
    (view,) = await lane_views(redis, keys, [family or ""])
    return view.held(stage)


async def batch_view(redis: Redis, keys: Keys, token: str) -> BatchView | None:
    """One batch by its token; None if there is no such open batch."""
    raw = await redis.hgetall(keys.batch(token))
    if not raw:
        return None
    state = {as_str(k): as_str(v) for k, v in raw.items()}
    return BatchView(
        token=token,
        family=state.get("family", ""),
        state=state.get("state", ""),
        batch_id=state.get("id", ""),
        requests=int(state.get("requests", 0)),
        unanswered=await redis.scard(keys.batch_unanswered(token)),
        age_s=_age_s(state.get("formed_ms")),
        oldest_s=_age_s(state.get("first_ms") or state.get("formed_ms")),
    )


def _age_s(ms: str | None) -> float:
    return max(0.0, time.time() - float(ms or 0) / 1000)
