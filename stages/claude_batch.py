"""claude-batch: tasks that can wait, answered through the Message Batches API at half price.

One input stream per model family, like claude-call. Each task's paid call is claimed first
(`pipeline.claude.task_record`, as for a plain call: an answer already recorded is handed on,
another live entry of the task means this one is a duplicate), its worst-case cost at batch
rates is reserved against the budgets (`pipeline.claude.budget`: over budget, it is deferred
or failed as a plain call would be), then the task is put on its family's shelf and its entry
acknowledged: from there the batch lane
(`pipeline.claude.batch_lane`) forms batches, sends them, polls them and hands each answer to
the store exactly once, or the task to claude-call when its batch did not answer it.
"""

from __future__ import annotations

import asyncio
import functools

from pipeline import Drop, Forward, Handler, Message, Outcome, Reject, Services, Settings, Stage
from pipeline.claude import (
    BatchLane,
    ClaimState,
    Reservation,
    Routed,
    TaskRecords,
    held_in_batches,
    make_batch_client,
)

NAME = "claude-batch"
#: Shelving is a Redis round trip or two: a few dozen in flight keep up with any producer.
CONCURRENCY = 64


async def build(services: Services[Settings]) -> Handler:
    """The handler, and this process's batchers (one per family, each working only while
    this process holds its family's lease)."""
    settings = services.settings
    records = TaskRecords.for_stage(services, NAME)
    lane = BatchLane(
        services, NAME, records,
        client=lambda: make_batch_client(settings.claude),
        stage_stream=lambda family: services.keys.stream("call", family),
    )  # fmt: skip
    stop = asyncio.Event()
    # Not on a partitioned deployment yet (the router sends nothing here then).
    families = [] if services.keys.partitions else settings.claude.models
    batchers = [asyncio.create_task(lane.run(family, stop)) for family in families]

    async def close() -> None:
        stop.set()  # every step can be taken again, so one cut short is simply redone
        for batcher in batchers:
            batcher.cancel()
        await asyncio.gather(*batchers, return_exceptions=True)
        await lane.aclose()

    services.on_close(close)

    async def handle(msg: Message) -> Outcome:
        routed = msg.body(Routed)
        claim = await records.claim(msg, routed)
        if claim.state is ClaimState.RECORDED and claim.answer is not None:
            return Forward("store", claim.answer.to_store())  # answered before a crash
        if claim.state is ClaimState.HELD:
            return Drop("another entry of this task holds its call")
        if claim.state is ClaimState.CONFLICT:
            return Reject(f"id {msg.task_id!r} already holds the answer to another request")
        granted = await lane.budget.reserve(routed, batch=True)
        if not isinstance(granted, Reservation):
            return granted  # over budget: deferred, failed (as for a plain call)
        if not await lane.shelve(msg, granted, claim.fence):
            await lane.budget.release(granted)  # shelved before: that one holds its own
        return Drop("shelved: the batch lane answers it")

    return handle


def stage(settings: Settings) -> Stage:
    """The stage with one lane per model family named in `settings.claude.models`."""
    lanes = tuple(settings.claude.models)
    held = functools.partial(held_in_batches, NAME)
    return Stage(NAME, "batch", build=build, lanes=lanes, concurrency=CONCURRENCY, held=held)
