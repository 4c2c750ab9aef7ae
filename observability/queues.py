"""Queue gauges (backlog, pending, lag, oldest age, delayed retries, DLQ, held tasks) from a
periodic poll.

One pipelined round trip (`pipeline.runtime.status.gather_status`) every few seconds per
worker, never per message: the gauges read the latest snapshot when a scrape or an OTLP export asks.
Every worker reports every stage, so a stage with no workers left still shows its backlog.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from redis.asyncio import Redis

from pipeline.runtime.keys import Keys
from pipeline.runtime.stage import App
from pipeline.runtime.status import Status, StreamStatus, gather_status

log = logging.getLogger(__name__)

_StreamValue = Callable[[StreamStatus], float | None]

#: (instrument name, unit, description, value of one stream) -> pipeline_stream_backlog, …
STREAM_GAUGES: tuple[tuple[str, str, str, _StreamValue], ...] = (
    ("pipeline.stream.backlog", "{entry}", "Entries in the stage's input stream (not yet acked)",
     lambda s: s.backlog),
    ("pipeline.stream.pending", "{entry}", "Entries delivered to a worker, not yet handed on",
     lambda s: s.pending),
    ("pipeline.stream.lag", "{entry}", "Entries not yet delivered to the group (Redis >= 7)",
     lambda s: s.lag),
    ("pipeline.stream.oldest_pending_age", "s", "Age of the oldest pending entry (0: none)",
     lambda s: s.oldest_pending_s or 0.0),
    ("pipeline.delayed.retries", "{entry}", "Entries waiting in the delayed-retry set",
     lambda s: s.delayed),
)  # fmt: skip


class QueuePoller:
    """Keeps the latest `Status`; `None` while Redis cannot be read (gauges then go quiet)."""

    def __init__(self, redis: Redis, keys: Keys, app: App, every_s: float) -> None:
        self._redis = redis
        self._keys = keys
        self._app = app
        self.every_s = every_s
        self.latest: Status | None = None

    async def poll(self) -> None:
        try:
            self.latest = await gather_status(self._redis, self._keys, self._app)
        except Exception as exc:  # status only: never let it hurt the worker
            if self.latest is not None:
                log.warning("queue metrics: cannot read Redis (%r); gauges paused", exc)
            self.latest = None

    async def run(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(self.every_s)

    def register(self, meter: Meter) -> None:
        """Create the observable gauges that read this poller's snapshot."""
        for name, unit, description, value in STREAM_GAUGES:
            meter.create_observable_gauge(
                name, [self._stream_callback(value)], unit=unit, description=description
            )
        meter.create_observable_gauge(
            "pipeline.dlq.size", [self._dlq], unit="{entry}", description="Entries in the DLQ"
        )
        meter.create_observable_gauge(
            "pipeline.held.tasks", [self._held_tasks], unit="{task}",
            description="Tasks a stage holds outside its streams, by state (the batch lane: "
            "queued for a batch, in_batch)",
        )  # fmt: skip
        meter.create_observable_gauge(
            "pipeline.held.oldest_age", [self._held_age], unit="s",
            description="Age of the oldest task a stage holds outside its streams (0: none)",
        )  # fmt: skip

    def _stream_callback(
        self, value: _StreamValue
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            status = self.latest
            if status is None:
                return []
            return [
                Observation(v, {"stage": s.stage, "lane": s.lane or ""})
                for s in status.streams
                if (v := value(s)) is not None
            ]

        return observe

    def _held_tasks(self, _: CallbackOptions) -> Iterable[Observation]:
        status = self.latest
        if status is None:
            return []
        return [
            Observation(n, {"stage": h.stage, "lane": h.lane or "", "state": state})
            for h in status.held
            for state, n in h.tasks.items()
        ]

    def _held_age(self, _: CallbackOptions) -> Iterable[Observation]:
        status = self.latest
        if status is None:
            return []
        return [
            Observation(h.oldest_s or 0.0, {"stage": h.stage, "lane": h.lane or ""})
            for h in status.held
        ]

    def _dlq(self, _: CallbackOptions) -> Iterable[Observation]:
        status = self.latest
        return [] if status is None else [Observation(status.dlq)]
