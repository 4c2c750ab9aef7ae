"""Planning a hand-off: what a handler's outcome (or a failure before it ran) becomes, as one
`Record` for the hand-off script: the next stage's entry, a delayed retry, a result, a dead
letter with its `failed` result. Also where the entry's span is told what was decided.

The planner decides *what* is written; the runner decides *when* it is sent, and with which
fence (`StageRunner._fence`): ownership is checked at commit time, not here.
"""

from __future__ import annotations

import contextvars
import logging
import time

from pipeline.runtime.dlq import dlq_fields, entry_of, raw_entry
from pipeline.runtime.handoff import Record
from pipeline.runtime.hooks import Hook
from pipeline.runtime.inflight import Consumer, Inflight
from pipeline.runtime.outcome import Complete, Defer, Drop, Forward, Outcome, Reject, Retry
from pipeline.runtime.results import failed_result, result_ttl
from pipeline.runtime.retry import GiveUp
from pipeline.runtime.stage import Message
from pipeline.runtime.wire import (
    ENVELOPE_FIELD,
    Envelope,
    delayed_member,
    encode_body,
    encode_envelope,
    internal_fields,
    onward,
    task_id_of,
)
from pipeline.runtime.wire import raw_fields_text as _raw_text

__all__ = ["Planner"]

log = logging.getLogger(__name__)


class Planner:
    """Plans the hand-offs of one consumer (one stage on one stream)."""

    def __init__(self, consumer: Consumer) -> None:
        self._c = consumer
        self._entry_limits: dict[str, int] = {}

    def plan(self, inf: Inflight, msg: Message, outcome: Outcome) -> Record:
        env = msg.envelope
        if isinstance(outcome, Forward):
            target = self._c.ctx.app.stage(outcome.to)
            if target.lanes and outcome.lane not in target.lanes:
                return self.dead_letter(inf, env, f"no lane {outcome.lane!r} in {target.name}")
            rec = self.record(inf)
            nxt = onward(
                env, attempt=1, enqueued_ms=_now_ms(), body=encode_body(outcome.body),
                trace=self.trace_out(inf, env, "forward", target.name), origin_id=msg.origin_id,
                fields=None if outcome.fields is None else dict(outcome.fields),
            )  # fmt: skip
            packed = encode_envelope(nxt)
            limit = self._entry_limits.get(target.name) or self.entry_limit(target.name)
            if len(packed) > limit:  # its next stage could not read it
                reason = f"entry for {target.name} is {len(packed):,} bytes, over its limit"
                return self.dead_letter(inf, env, f"{reason} ({limit:,})")
            key = self._c.keys.stream(target.stream, outcome.lane if target.lanes else None)
            rec.xadd(key, internal_fields(packed, env.task_id))
            return rec
        if isinstance(outcome, Complete):
            rec = self.record(inf)
            if outcome.result is not None:
                result = dict(outcome.result)
                self._add_result(rec, env.task_id, result, env.fields, msg.origin_id, outcome.ttl_s)
            return rec
        if isinstance(outcome, Retry):
            delay = self._c.ctx.retry_policy.next_delay(env.attempt, outcome.delay_ms)
            if isinstance(delay, GiveUp):
                reason = f"gave up after {env.attempt} attempts: {outcome.reason}"
                return self.dead_letter(inf, env, reason)
            self._c.stats["retried"] += 1
            if self._c.ctx.hooks:
                self._c.ctx.spawn_hook("on_retry", msg, delay, outcome.reason)
            return self.requeue(inf, env, delay, "retry", outcome.reason, next_attempt=True)
        if isinstance(outcome, Defer):
            return self.requeue(inf, env, outcome.delay_ms, "defer", outcome.reason)
        if isinstance(outcome, Drop):
            self._c.stats["duplicates"] += 1
            log.debug("%s: dropped %s: %s", self._c.name, env.task_id, outcome.reason)
            return self.record(inf)
        if isinstance(outcome, Reject):
            return self.dead_letter(inf, env, outcome.reason, result=False)
        return self.dead_letter(inf, env, outcome.reason, extra=outcome.result)

    def entry_limit(self, stage: str) -> int:
        """The most bytes an entry of `stage` may have (its `max_entry_bytes`)."""
        limit = self._entry_limits.get(stage)
        if limit is None:
            limit = self._entry_limits[stage] = self._c.ctx.settings.runtime_for(
                stage
            ).max_entry_bytes
        return limit

    def record(self, inf: Inflight) -> Record:
        """A record fenced by the entry's delivery count; `_fence` may relax it when sent."""
        return Record(inf.entry_id, inf.deliveries)

    def trace_out(
        self, inf: Inflight, env: Envelope, action: str, detail: str, delay_ms: int | None = None
    ) -> tuple[str | None, str | None]:
        """The trace context the outgoing entry carries: its span's, else the incoming."""
        if inf.span is not None:
            try:
                return inf.span.handoff(action, detail, delay_ms)
            except Exception as exc:
                self.tracer_failed(inf, exc)
        return env.traceparent, env.tracestate

    # A tracer that raises is logged and dropped for the entry: tracing never fails a task.

    def trace_in(self, tracer: Hook, inf: Inflight, msg: Message) -> contextvars.Context | None:
        """Open the entry's span (if its trace is sampled): the context its handler runs in."""
        try:
            inf.span = span = tracer.start_span(msg)
            return None if span is None else span.task_context()
        except Exception as exc:
            self.tracer_failed(inf, exc)
            return None

    def finish_span(self, inf: Inflight, outcome: Outcome | BaseException | None) -> None:
        if inf.span is not None:
            try:
                inf.span.finish(outcome)
            except Exception as exc:
                self.tracer_failed(inf, exc)

    def tracer_failed(self, inf: Inflight, exc: Exception) -> None:
        inf.span = None
        self._c.ctx.log_once(f"{self._c.name}:tracer", "tracing failed (the entry goes on)", exc)

    def requeue(
        self, inf: Inflight, env: Envelope, delay_ms: int, action: str, reason: str,
        next_attempt: bool = False,
    ) -> Record:  # fmt: skip
        trace = self.trace_out(inf, env, action, reason, delay_ms)
        later = onward(
            env, attempt=env.attempt + 1 if next_attempt else env.attempt,
            enqueued_ms=_now_ms() + delay_ms, trace=trace, origin_id=env.origin_id or inf.entry_id,
        )  # fmt: skip
        rec = self.record(inf)
        rec.zadd(self._c.delayed, delay_ms, delayed_member(later))
        return rec

    def _add_result(
        self, rec: Record, task_id: str, result: dict[str, str], fields: dict[str, str],
        owner: str, ttl_s: int | None = None,
    ) -> None:  # fmt: skip
        """Every result, either kind, is written here, with its TTL resolved once."""
        keys, res = self._c.keys, self._c.ctx.settings.results
        ttl = result_ttl(fields, res.ttl_s, ttl_s)
        event = {"id": task_id, "status": result.get("status", "completed")}
        # With partitions the event queues the result for publishing: never trimmed.
        maxlen = res.done_maxlen if keys.partition is None else 0
        rec.result(
            keys.landing(task_id), ttl, result, keys.landed, maxlen, event,
            keys.task(task_id), owner,
        )  # fmt: skip

    def dead_letter(
        self, inf: Inflight, env: Envelope, reason: str, extra: object = None, result: bool = True
    ) -> Record:
        traceparent, tracestate = self.trace_out(inf, env, "dead_letter", reason)
        return self._letter(
            inf,
            env.task_id,
            env.origin_id or inf.entry_id,
            env.fields,
            entry_of(env),
            reason,
            env.attempt,
            traceparent,
            tracestate,
            extra if isinstance(extra, dict) else None,
            result,
        )

    def dead_letter_raw(self, inf: Inflight, raw: dict[bytes, bytes], reason: str) -> Record:
        fields = _raw_text(raw, self._c.ctx.settings.dlq.max_field_bytes)
        internal = ENVELOPE_FIELD in raw  # its origin is inside what could not be read
        return self._letter(
            inf,
            task_id_of(inf.entry_id, raw),
            "" if internal else inf.entry_id,
            fields,
            raw_entry(raw),
            reason,
            1,
            fields.get("traceparent"),
            fields.get("tracestate"),
            None,
        )

    def _letter(
        self,
        inf: Inflight,
        task_id: str,
        owner: str,
        fields: dict[str, str],
        original: bytes,
        reason: str,
        attempts: int,
        traceparent: str | None,
        tracestate: str | None,
        extra: dict[str, str] | None,
        result: bool = True,
    ) -> Record:
        settings = self._c.ctx.settings
        rec = self.record(inf)
        letter = dlq_fields(
            task_id=task_id,
            stage=self._c.stage.name,
            stream=self._c.stream,
            entry_id=inf.entry_id,
            error=reason,
            deliveries=inf.deliveries,
            attempts=attempts,
            fields=fields,
            traceparent=traceparent,
            tracestate=tracestate,
            max_field_bytes=settings.dlq.max_field_bytes,
            entry=original,
            owner=owner,
            result_kept=not result,
        )
        keys, dlq = self._c.keys, settings.dlq
        rec.letter(keys.dlq, keys.dlq_bytes, dlq.maxlen, dlq.max_bytes, letter)
        self._c.stats["dead"] += 1
        if not result:  # the id belongs to another task: its result stays as it is
            log.info("%s: rejected %s: %s", self._c.name, task_id, reason)
            return rec
        failed = failed_result(
            reason,
            attempts=attempts,
            fields=fields,
            traceparent=traceparent,
            origin_ms=inf.msg.envelope.origin_ms if inf.msg else None,
            extra=extra,
        )
        self._add_result(rec, task_id, failed, fields, owner)
        if self._c.ctx.hooks:
            self._c.ctx.spawn_hook("on_dead_letter", self._c.stage.name, task_id, reason)
        log.debug("%s: dead-lettered %s: %s", self._c.name, task_id, reason)
        return rec


def _now_ms() -> int:
    return int(time.time() * 1000)
