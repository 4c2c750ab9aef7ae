"""The consumer loop of one stage (one input stream): read, run handlers, hand off atomically.

Carries guarantees 1 (ack only with the hand-off), 2 (leases, reclaim, fencing), 3 (poison to
the DLQ), 4 (durable delayed retries) and 7 (clean shutdown, outages waited out). Leases,
reclaim and delayed retries live in their own modules; this file owns the entry's life cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from functools import partial

from pipeline.runtime.context import WorkerContext
from pipeline.runtime.delayed import promote_loop
from pipeline.runtime.errors import AuthError, InvalidTask, PermanentError, TransientError
from pipeline.runtime.groups import ensure_group
from pipeline.runtime.handoff import Record, build_call
from pipeline.runtime.inflight import Inflight
from pipeline.runtime.keys import Keys
from pipeline.runtime.leases import drain_own, reclaim_loop, renew, renew_loop
from pipeline.runtime.outcome import Fail, Outcome, Retry
from pipeline.runtime.planner import Planner
from pipeline.runtime.replies import read_entries
from pipeline.runtime.stage import Handler, Message, Stage
from pipeline.runtime.wire import (
    decode_entry,
    entry_bytes,
)

log = logging.getLogger(__name__)


class StageRunner:
    """Runs one stage on one input stream (one lane) inside a worker process."""

    def __init__(
        self, stage: Stage, lane: str | None, ctx: WorkerContext, concurrency: int,
        handler: Handler, keys: Keys | None = None,
    ) -> None:  # fmt: skip
        """`keys`: the partition this runner serves (default: the worker's, unpartitioned):
        its input stream and everything its hand-offs write."""
        self.stage = stage
        self.handler = handler
        self.lane = lane
        self.ctx = ctx
        self.keys = keys or ctx.keys
        self.rt = ctx.settings.runtime_for(stage.name)
        self.concurrency = concurrency
        self.stream = self.keys.stream(stage.stream, lane)
        self.delayed = self.keys.delayed(self.stream)
        self.group = stage.name
        self.inflight: dict[str, Inflight] = {}
        self.outbox: list[tuple[Inflight, Record]] = []
        self._outbox_ready = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._paused_until = 0.0
        self._committing = False
        self._first = stage is ctx.app.stages[0]
        self._where = (self.stream, self.group, ctx.consumer)
        self._loop = asyncio.get_running_loop()
        self.planner = Planner(self)
        self.stats = {
            "handled": 0, "fenced": 0, "dead": 0, "retried": 0, "reclaimed": 0, "reads": 0,
            "handoffs": 0, "duplicates": 0,
        }  # fmt: skip

    @property
    def name(self) -> str:
        name = f"{self.stage.name}[{self.lane}]" if self.lane else self.stage.name
        return name if self.keys.partition is None else f"{name}@p{self.keys.partition}"

    @property
    def paused(self) -> bool:
        return time.monotonic() < self._paused_until

    async def run(self) -> None:
        """Serve the stream until `ctx.stopping`, then shut down within the grace period."""
        await self.ensure_group()
        hooks = self.ctx.hooks
        if hooks:
            await hooks.emit("on_worker_start", self.stage.name)
        async with asyncio.TaskGroup() as tg:
            background = [
                tg.create_task(loop(self), name=f"{self.name}:{loop.__name__}")
                for loop in (_flush_loop, renew_loop, reclaim_loop, promote_loop)
            ]
            await drain_own(self)
            await self.read_loop()
            await self._shutdown()
            for task in background:
                task.cancel()
        if hooks:
            await hooks.emit("on_worker_stop", self.stage.name, after=True)
        log.info("%s stopped: %s", self.name, ", ".join(f"{k} {v}" for k, v in self.stats.items()))

    async def _shutdown(self) -> None:
        """Let handlers finish within the grace period, and handlers doing paid work (see
        `Message.finish_before_exit`) within their own bound; hand back the rest."""
        running = await self.drain_inflight(self.rt.grace_s)
        finishing = [i for i in running if i.msg is not None and i.msg.finish_by > 0]
        if finishing and not self.ctx.forced:
            until = max(i.msg.finish_by for i in finishing if i.msg is not None)
            log.info(
                "%s: waiting up to %.0fs for %d paid calls already sent",
                self.name,
                max(0.0, until - time.monotonic()),
                len(finishing),
            )
            paid = {i.entry_id for i in finishing}
            await self._cancel_and_hand_back([i for i in running if i.entry_id not in paid])
            running = await self.drain_inflight(until - time.monotonic())
        await self._cancel_and_hand_back(running)
        while self.outbox or self._committing:
            self._slot_free.clear()
            await self._slot_free.wait()

    async def _cancel_and_hand_back(self, running: list[Inflight]) -> None:
        """Cancel unfinished handlers and hand their entries back at once, without counting
        a delivery: a deploy must not bring a healthy task closer to the DLQ."""
        if not running:
            return
        for inf in running:
            if inf.task is not None:
                inf.task.cancel()
        await asyncio.gather(*(i.task for i in running if i.task), return_exceptions=True)
        running = [inf for inf in running if not inf.decided]
        await renew(self, running, idle_ms=self.rt.lease_ms)
        for inf in running:
            self.inflight.pop(inf.entry_id, None)
        log.warning(
            "%s: handed back %d unfinished entries for other workers to take",
            self.name,
            len(running),
        )

    # ---- reading ----------------------------------------------------------------------

    async def ensure_group(self) -> bool:
        """Create the stream's consumer group (and the stream) unless it exists; True if
        it had to be created."""

        return await ensure_group(self.ctx.redis, self.ctx.available, self.stream, self.group)

    async def recreate_group(self) -> None:
        """NOGROUP: the stream or its group is gone (a Redis restarted without persistence,
        or deleted by hand). Recreate it at `0` and say what was lost; entries this worker
        held are fenced out by the new group (nobody owns them)."""
        stream_existed = bool(
            await self.ctx.available.call(lambda: self.ctx.redis.exists(self.stream))
        )
        if await self.ensure_group():
            log.warning(
                "%s: %s; recreated it at 0",
                self.name,
                "consumer group was lost (entries still in the stream are delivered again)"
                if stream_existed
                else "stream was lost with everything it held (Redis restarted without "
                "persistence?)",
            )

    def wake(self) -> None:
        """Let waits on slots re-check their condition (stop, force)."""
        self._slot_free.set()

    def free_slots(self) -> int:
        """Room for more entries; never below 0: a read and a reclaim in flight together may
        take a few more than `concurrency` (a negative count once reached XAUTOCLAIM, which
        refused it and stopped the worker)."""
        return max(0, self.concurrency - len(self.inflight))

    async def wait_for_slots(self, wanted: int) -> None:
        while self.free_slots() < wanted and not self.ctx.stopping.is_set():
            self._slot_free.clear()
            await self._slot_free.wait()

    async def read_loop(self) -> None:
        """Read new entries while there is room for them (bounded prefetch)."""
        min_batch = max(1, min(self.rt.read_count, self.concurrency) // 4)
        while not self.ctx.stopping.is_set():
            pause = self._paused_until - time.monotonic()
            if pause > 0:
                await self._sleep_unless_stopping(pause)
                continue
            await self.wait_for_slots(min(min_batch, self.concurrency))
            if self.ctx.stopping.is_set():
                break
            count = min(self.free_slots(), self.rt.read_count)
            sent_at = time.monotonic()
            reply = await self.ctx.available.call(
                partial(self._read_new, count), self.recreate_group
            )
            self.stats["reads"] += 1
            for entry_id, raw in read_entries(reply):
                self.start(entry_id, raw, deliveries=1, confirmed_at=sent_at)

    async def _read_new(self, count: int) -> object:
        """One XREADGROUP for up to `count` new entries (its reply is parsed by the caller)."""
        return await self.ctx.redis.xreadgroup(
            self.group,
            self.ctx.consumer,
            {self.stream: ">"},
            count=count,
            block=self.rt.block_ms,
        )

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ctx.stopping.wait(), timeout=seconds)

    # ---- handling ---------------------------------------------------------------------

    def start(
        self, entry_id: str, raw: dict[bytes, bytes] | None, deliveries: int, confirmed_at: float
    ) -> None:
        """Take ownership of an entry and start its handler (or dead-letter it at once)."""
        if entry_id in self.inflight:  # already ours (reclaim raced a drain): keep the first
            return
        inf = Inflight(entry_id, deliveries, confirmed_at)
        self.inflight[entry_id] = inf
        raw = raw or {}
        try:
            env = decode_entry(entry_id, raw, self.rt.max_entry_bytes)
        except InvalidTask as exc:
            self.submit(inf, self.planner.dead_letter_raw(inf, raw, str(exc)))
            return
        msg = Message(env, entry_id, self.stage.name, self.lane, deliveries, self._where)
        if self._first:  # only the ingress checks what can travel
            msg.size = entry_bytes(raw)
        inf.msg = msg
        tracer = self.ctx.hooks.tracer
        context = None if tracer is None else self.planner.trace_in(tracer, inf, msg)
        if deliveries > self.rt.max_deliveries:
            reason = f"delivered {deliveries} times (max_deliveries={self.rt.max_deliveries})"
            self.submit(inf, self.planner.dead_letter(inf, env, reason))
            self.planner.finish_span(inf, None)
            return
        inf.task = self._loop.create_task(self._handle(inf, msg), context=context)

    async def _handle(self, inf: Inflight, msg: Message) -> None:
        hooks = self.ctx.hooks
        if hooks:
            await hooks.emit("before_handle", msg)
        try:
            outcome: Outcome = await self.handler(msg)
        except asyncio.CancelledError as exc:
            self.planner.finish_span(inf, exc)
            if hooks:
                await hooks.emit("after_handle", msg, exc, after=True)
            raise
        except InvalidTask as exc:
            outcome = Fail(f"invalid task: {exc}")
        except PermanentError as exc:
            outcome = Fail(str(exc))
        except TransientError as exc:
            delay = None if exc.retry_after_s is None else int(exc.retry_after_s * 1000)
            outcome = Retry(str(exc), delay_ms=delay)
        except AuthError as exc:
            self._pause(exc)
            later = self.planner.requeue(
                inf, msg.envelope, int(exc.pause_s * 1000), "pause", str(exc)
            )
            self.planner.finish_span(inf, exc)
            if hooks:
                await hooks.emit("after_handle", msg, exc, after=True)
            self.submit(inf, later)
            return
        except Exception as exc:
            self.ctx.log_once(f"{self.name}:{type(exc).__name__}", "handler raised", exc)
            outcome = Retry(f"{type(exc).__name__}: {exc}")
        record = self.planner.plan(inf, msg, outcome)  # first: the span records the hand-off
        self.planner.finish_span(inf, outcome)
        if hooks:
            await hooks.emit("after_handle", msg, outcome, after=True)
        self.submit(inf, record)

    def _pause(self, exc: AuthError) -> None:
        if time.monotonic() >= self._paused_until:
            log.error(
                "%s PAUSED for %.0fs: credentials refused (%s). Entries stay queued; "
                "fix the key and the stage resumes by itself.",
                self.name,
                exc.pause_s,
                exc,
            )
        self._paused_until = time.monotonic() + exc.pause_s
        self.ctx.mark_paused(self.stage.name, exc.pause_s, str(exc))

    # ---- committing -------------------------------------------------------------------

    def _fence(self, batch: list[tuple[Inflight, Record]], first_try: bool) -> None:
        """Decide, as the batch is sent, which records must prove ownership in the script.

        The check may be skipped only for an entry whose lease was confirmed less than half
        a lease ago *now*: nobody may reclaim an entry before it has been idle for a whole
        lease. Deciding earlier (when the handler returned) would let a process that was
        stalled between the two commit on stale confidence. A retried send fences all: the
        reply of the earlier try may be lost.
        """
        now = time.monotonic()
        fresh_after = now - self.rt.lease_ms / 2000
        for inf, rec in batch:
            fresh = first_try and inf.confirmed_at > fresh_after and not inf.lost
            rec.expected_deliveries = 0 if fresh else inf.deliveries

    def submit(self, inf: Inflight, rec: Record) -> None:
        inf.decided = True
        self.outbox.append((inf, rec))
        self._outbox_ready.set()

    async def flush_loop(self) -> None:
        """Send queued hand-offs, one script call per batch, until cancelled with none left."""
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self.outbox:
                batch = self.outbox[: self.rt.handoff_batch]
                del self.outbox[: len(batch)]
                self._committing = True
                try:
                    await asyncio.shield(self._commit(batch))
                finally:
                    self._committing = False
                    self._slot_free.set()

    async def _commit(self, batch: list[tuple[Inflight, Record]]) -> None:
        records = [rec for _, rec in batch]
        head = [self.group, self.ctx.consumer, "1" if self.ctx.has_xackdel else "0"]
        first = True
        statuses = [0] * len(batch)

        async def run() -> list[int]:
            nonlocal first
            self._fence(batch, first)
            first = False
            keys, packed = build_call(self.stream, records)
            sent = await self.ctx.scripts.handoff(keys=keys, args=[*head, *packed])
            # Sent again (a lost reply, a failover): what an earlier try handed on stays so.
            statuses[:] = [max(was, int(now)) for was, now in zip(statuses, sent, strict=True)]
            return statuses

        async def commit() -> list[int]:
            return await self.ctx.available.call(run, self.recreate_group)

        if self.ctx.replication is not None:  # the batch counts once a replica has it
            await self.ctx.replication.write(commit, self.stream)
        else:
            await commit()
        self.stats["handoffs"] += 1
        for (inf, _rec), status in zip(batch, statuses, strict=True):
            self.inflight.pop(inf.entry_id, None)
            if status == 0:
                self.stats["fenced"] += 1
                log.debug(
                    "%s: %s was reclaimed elsewhere; late result dropped", self.name, inf.entry_id
                )
            else:
                self.stats["handled"] += 1
        self._slot_free.set()

    # ---- shutdown ---------------------------------------------------------------------

    def finish_deadline(self) -> float:
        """The latest monotonic time until which a handler may finish paid work (0: none)."""
        return max((i.msg.finish_by for i in self.inflight.values() if i.msg), default=0.0)

    async def drain_inflight(self, grace_s: float) -> list[Inflight]:
        """Wait up to `grace_s` for in-flight entries; return those still running."""
        deadline = time.monotonic() + grace_s
        while self.inflight and time.monotonic() < deadline and not self.ctx.forced:
            self._slot_free.clear()
            try:
                await asyncio.wait_for(self._slot_free.wait(), timeout=deadline - time.monotonic())
            except TimeoutError:
                break
        return [inf for inf in self.inflight.values() if not inf.decided]


async def _flush_loop(runner: StageRunner) -> None:
    await runner.flush_loop()


def _now_ms() -> int:
    return int(time.time() * 1000)
