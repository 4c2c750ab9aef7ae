"""The batch lane: tasks that can wait go through Anthropic's Message Batches API at half price.

A task routed here is claimed (`pipeline.claude.task_record`, as for a plain call) and put on
its family's **shelf** (`batch_shelve.lua`: a hash in Redis, not a pending list, since a batch
may take a day); its entry is then acknowledged. In one process per family at a time (a
lease), a **batcher** turns the queue into batches and sees each through:

1. *form* (`batch_form.lua`): the oldest queued tasks become a batch in one step, with a token
   and the tasks numbered; the intent is recorded before anything is sent. Each request's
   `custom_id` is `<token>-<n>`, so the batch carries its token to the API and back.
2. *create*: one `batches.create`; its id is recorded at once. A batch whose create failed
   or whose id was never recorded (the process died in between) is **found, not sent
   again**: the batches created since its intent are listed, and one whose results carry the
   token is adopted; it is created again only when no batch it could be has been created.
3. *poll* every `batch.poll_s`, less often as the batch ages (`poll_interval_s`), until the
   batch has ended.
4. *answer*: its results are read line by line (never the whole file in memory); each
   succeeded request's answer is recorded against its task, written to the response cache
   (when cacheable, as a plain call's answer is), then handed to the store, and
   any other outcome (errored, expired, canceled, or no line at all) sends the task to the
   standard lane, at full price, rather than wait another day. Each task leaves the batch
   exactly once (`batch_deliver.lua`: taken off the batch, the shelf and onto its next
   stream in one step), so a batcher that dies half way and a successor that reads the
   results again hand nothing on twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from pipeline.claude.budget import Budget, Reservation
from pipeline.claude.flights import Flights
from pipeline.claude.scripts import load
from pipeline.claude.settings import Settings
from pipeline.claude.task import Answer, Routed
from pipeline.claude.task_record import ClaimState, TaskRecords
from pipeline.runtime import scripts as runtime_scripts
from pipeline.runtime.held import HeldReport
from pipeline.runtime.replies import as_int, as_str
from pipeline.runtime.services import Services
from pipeline.runtime.stage import Message
from pipeline.runtime.wire import (
    decode_body,
    decode_envelope,
    encode_body,
    encode_envelope,
    internal_entry,
    onward,
)

if TYPE_CHECKING:
    import anthropic

__all__ = ["BatchLane", "Shelved"]

log = logging.getLogger(__name__)

#: Batches created this long before a batch's intent may still be it (clock skew).
_SKEW_S = 300.0
#: Results are handed on in chunks of this many lines (bounded memory, few round trips),
#: `_PARALLEL` tasks at a time (each a few round trips on a connection of its own).
_CHUNK = 256
_PARALLEL = 16


class Shelved(msgspec.Struct, array_like=True, frozen=True):
    """A task on the shelf: its entry (envelope, packed), the claim it will be paid under,
    when it arrived, and the budget reservation it holds ("" window: none)."""

    fence: int
    envelope: bytes
    shelved_ms: int = 0
    window: str = ""
    micro_usd: int = 0

    def reservation(self, routed: Routed) -> Reservation:
        return Reservation(routed, self.window, self.micro_usd)


_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder(Shelved).decode


class BatchLane:
    """One worker process's part in the batch lane of every family."""

    def __init__(
        self,
        services: Services[Settings],
        stage: str,
        records: TaskRecords,
        client: Callable[[], anthropic.AsyncAnthropic],
        stage_stream: Callable[[str], str],
    ) -> None:
        """`stage`: the stage that shelves (its settings, its name in reports). `client`:
        makes the API client on first use. `stage_stream(family)`: the standard lane's
        stream of a family, where a request a batch did not answer goes."""
        self._redis, self._keys = redis, keys = services.redis, services.keys
        self._available = available = services.available
        self._settings = settings = services.settings
        self._stage, self._records, self._hooks = stage, records, services.hooks
        self._make_client = client
        self._client: anthropic.AsyncAnthropic | None = None
        self._standard = stage_stream
        self._shelve = load(redis, "batch_shelve")
        self._form = load(redis, "batch_form")
        self._deliver = load(redis, "batch_deliver")
        self._hold = runtime_scripts.load(redis, "hold")
        lease_ms = settings.runtime_for(stage).lease_ms
        self._flights = Flights(redis, keys, available, lease_ms, settings)
        #: Batched spend counts against the budgets: reserved at shelving (batch rates),
        #: settled when the answer is handed on, given back when the task leaves for the
        #: standard lane (which reserves again, at list prices).
        self.budget = Budget(settings, redis, keys, available)
        self._token = secrets.token_hex(8)
        self._polled: dict[str, float] = {}
        self._tries: dict[str, int] = {}  # refused creates, per batch: for the backoff
        self._not_before: dict[str, float] = {}
        self._ticket = redis.register_script(_TICKET)
        self._pause_s = settings.claude.auth_pause_s

    # ---- the stage's side: shelving ----------------------------------------------------------

    async def shelve(self, msg: Message, granted: Reservation, fence: int) -> bool:
        """Put the task on its family's shelf, to be sent as `granted.routed` (the budget
        may have downgraded it) and paid under `fence`; once: a redelivery changes nothing.
        True if shelved now (then the lane owns the reservation)."""
        routed = granted.routed
        env = msgspec.structs.replace(
            msg.envelope, origin_id=msg.origin_id, body=encode_body(routed)
        )
        shelved = Shelved(fence, encode_envelope(env), _now_ms(), granted.window, granted.micro_usd)
        family = routed.family
        keys = [
            self._keys.batch_shelf(family),
            self._keys.batch_queue(family),
            self._keys.task(msg.task_id),
        ]
        args: list[str | bytes | int] = [
            msg.task_id, _pack(shelved), shelved.shelved_ms,
            self._settings.batch.worst_case_s + 3600,
        ]  # fmt: skip
        reply = await self._available.call(lambda: self._shelve(keys=keys, args=args))
        return as_int(reply) == 1

    # ---- the batcher ---------------------------------------------------------------------------

    async def run(self, family: str, stop: asyncio.Event) -> None:
        """Form, send, poll and answer `family`'s batches while this process holds its lease."""
        policy = self._settings.batch
        tick = max(0.05, min(1.0, policy.max_wait_s / 4, policy.poll_s))
        while not stop.is_set():
            try:
                if await self._lead(family):
                    await self.step(family)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed step is tried again next tick
                log.warning("batch lane %s: %s", family, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), tick)

    async def step(self, family: str) -> None:
        """One round: form what is due, then move every open batch one step on."""
        while await self._due(family):
            token = await self.form(family)
            if token is None:
                break
            await self.send(token)
        for token in await self._open(family):
            await self.advance(token)

    async def _lead(self, family: str) -> bool:
        ttl_ms = int(self._settings.batch.leader_ttl_s * 1000)
        key = self._keys.batch_leader(family)
        reply = await self._hold(keys=[key], args=[self._token, ttl_ms])
        return as_int(reply) == 1

    async def _due(self, family: str) -> bool:
        policy = self._settings.batch
        queue = self._keys.batch_queue(family)
        waiting = await self._redis.zcard(queue)
        if not waiting:
            return False
        if waiting >= policy.max_requests:
            return True
        oldest = await self._redis.zrange(queue, 0, 0, withscores=True)
        return bool(oldest) and _now_ms() - float(oldest[0][1]) >= policy.max_wait_s * 1000

    async def form(self, family: str) -> str | None:
        """Take the oldest queued tasks into a new batch; its token, or None if none wait."""
        token = secrets.token_hex(8)
        policy = self._settings.batch
        keys = [
            self._keys.batch_queue(family),
            self._keys.batch_shelf(family),
            self._keys.batch(token),
            self._keys.batch_members(token),
            self._keys.batch_unanswered(token),
            self._keys.batches(family),
        ]
        args: list[str | int] = [policy.max_requests, _MAX_BATCH_BYTES, token, family, _now_ms()]
        taken = as_int(await self._form(keys=keys, args=args))
        if not taken:
            return None
        log.info("batch lane %s: batch %s formed with %d tasks", family, token, taken)
        return token

    async def advance(self, token: str) -> None:
        """Move one open batch on by one step, as its recorded state says."""
        state = _text_map(await self._redis.hgetall(self._keys.batch(token)))
        kind = state.get("state")
        if kind == "forming":
            await self._create(token, first=False)
        elif kind == "submitted":
            await self._poll(token, state["id"], _now_ms() - int(state["formed_ms"]))
        elif kind == "ended":
            await self.answer(token, state["id"], state["family"])

    # ---- create, or find the batch a lost create made ------------------------------------------

    async def send(self, token: str) -> None:
        """Send a batch just formed (nothing of it can have been sent before)."""
        await self._create(token, first=True)

    async def _create(self, token: str, *, first: bool) -> None:
        """Send a formed batch. A batch that may have been sent before (`first` False: an
        earlier create failed or its process died) is looked for first."""
        from pipeline.claude import batch_api

        key = self._keys.batch(token)
        state = _text_map(await self._redis.hgetall(key))
        if not first:
            found = await self._find(token, state)
            if found is _UNDECIDED:
                return
            if isinstance(found, str):
                await self._redis.hset(key, mapping={"state": "submitted", "id": found})
                log.info("batch lane: batch %s found as %s (its create was not recorded)",
                         token, found)  # fmt: skip
                return
        family = state["family"]
        if time.monotonic() < self._not_before.get(token, 0.0):
            return  # the API refused it a moment ago: back off
        # The ticket to create, taken before anything is built: a process that took over the
        # lane meanwhile (this one stalled past its lease) sees the attempt and looks for it.
        ticket = await self._ticket(keys=[key], args=[state.get("attempted_ms", ""), _now_ms()])
        if not as_int(ticket) or not await self._lead(family):
            return
        requests = await self.requests(token, family)
        try:
            info = await batch_api.create(self._api(), requests, self._pause_s)
        except batch_api.CreateRefused as exc:
            if exc.permanent:  # the API will not take it: each request on its own, then
                log.warning("batch %s refused (%s): its tasks go to the standard lane",
                            token, exc)  # fmt: skip
                await self._abandon(token, family)
                return
            await self._redis.hdel(key, "attempted_ms")  # none made: the next try sends it
            tries = self._tries.get(token, 0) + 1
            self._tries[token] = tries
            self._not_before[token] = time.monotonic() + min(300.0, 2.0**tries)
            raise
        await self._redis.hset(key, mapping={"state": "submitted", "id": info.id})
        log.info("batch lane %s: batch %s sent as %s (%d requests)",
                 family, token, info.id, len(requests))  # fmt: skip

    async def _abandon(self, token: str, family: str) -> None:
        """Every task of a batch the API will never take goes to the standard lane."""
        left = await self._unanswered(token)
        await self._all_to_standard(_Batch(token, "", family), left, "refused")
        await self._forget(token, family)

    async def _find(self, token: str, state: dict[str, str]) -> str | object | None:
        """The id of the batch an unrecorded create of `token` made; None if no batch that
        could be it exists (safe to create); `_UNDECIDED` while one that could be it has not
        ended (its results, which carry the token, are not readable yet)."""
        from pipeline.claude import batch_api

        if "attempted_ms" not in state:
            return None  # formed, but its create never began
        # A create still on its way (a process stalled past its lease) could land after a
        # search found nothing: wait until it would have timed out before sending again.
        settled_ms = (self._settings.claude.timeout_s + self._settings.batch.leader_ttl_s) * 1000
        recent_attempt = _now_ms() - int(state["attempted_ms"]) < settled_ms
        since = int(state["formed_ms"]) / 1000 - _SKEW_S
        known = await self._known_ids()
        listed = batch_api.recent(self._api(), since, self._pause_s)
        async with contextlib.aclosing(listed):
            return await self._match(token, state, listed, known, recent_attempt)

    async def _match(
        self, token: str, state: dict[str, str], listed: AsyncIterator[Any], known: set[str],
        recent_attempt: bool,
    ) -> str | object | None:  # fmt: skip
        """`_find`'s search through the listed batches."""
        from pipeline.claude import batch_api

        undecided = False
        async for info in listed:
            if info.id in known or info.requests != int(state["requests"]):
                continue
            if await self._redis.hexists(self._keys.batch(token), f"not:{info.id}"):
                continue
            if info.processing_status != "ended":
                undecided = True
                continue
            first = await _first(batch_api.results(self._api(), info.id, self._pause_s))
            if first is not None and first.custom_id.startswith(f"{token}-"):
                return str(info.id)
            await self._redis.hset(self._keys.batch(token), f"not:{info.id}", 1)
        return _UNDECIDED if undecided or recent_attempt else None

    async def _known_ids(self) -> set[str]:
        ids: set[str] = set()
        for family in self._settings.claude.models:
            for token in await self._open(family):
                found = await self._redis.hget(self._keys.batch(token), "id")
                if found:
                    ids.add(as_str(found))
        return ids

    async def requests(self, token: str, family: str) -> list[dict[str, Any]]:
        """The batch's requests, as `batches.create` takes them."""
        members = await self._redis.hgetall(self._keys.batch_members(token))
        ordered = sorted((int(n), as_str(task_id)) for n, task_id in members.items())
        shelf = self._keys.batch_shelf(family)
        packed = await self._redis.hmget(shelf, [task_id for _, task_id in ordered])
        requests = []
        for (n, _), raw in zip(ordered, packed, strict=True):
            if raw is None:  # answered already (cannot be before a create, but never send it)
                continue
            routed = _routed_of(_unpack(_bytes(raw)))
            requests.append({"custom_id": f"{token}-{n}", "params": routed.body()})
        return requests

    # ---- poll, then answer -----------------------------------------------------------------------

    async def _poll(self, token: str, batch_id: str, age_ms: int) -> None:
        from pipeline.claude import batch_api

        now = time.monotonic()
        if now - self._polled.get(token, 0.0) < poll_interval_s(self._settings, age_ms / 1000):
            return
        self._polled[token] = now
        info = await batch_api.retrieve(self._api(), batch_id, self._pause_s)
        if info.processing_status == "ended":
            await self._redis.hset(self._keys.batch(token), "state", "ended")
            state = _text_map(await self._redis.hgetall(self._keys.batch(token)))
            await self.answer(token, batch_id, state["family"])

    async def answer(self, token: str, batch_id: str, family: str) -> None:
        """Hand every task of an ended batch on, exactly once, then forget the batch."""
        from pipeline.claude import batch_api

        batch = _Batch(token, batch_id, family)
        chunk: list[batch_api.BatchLine] = []
        lines = batch_api.results(self._api(), batch_id, self._pause_s)
        async with contextlib.aclosing(lines):  # its connection closes, however this ends
            async for line in lines:
                if line.custom_id.startswith(f"{token}-"):
                    chunk.append(line)
                if len(chunk) >= _CHUNK:
                    await self._hand_on(batch, chunk)
                    chunk = []
                    if not await self._lead(family):  # a long batch: keep the lease, or stop
                        raise _LeadLost(f"batch lane {family}: lease lost answering {token}")
        if chunk:
            await self._hand_on(batch, chunk)
        left = await self._unanswered(token)
        if left:  # no result line for them: the standard lane answers them
            log.warning("batch %s (%s): %d tasks had no result; sent to the standard lane",
                        token, batch_id, len(left))  # fmt: skip
            await self._all_to_standard(batch, left, "missing")
        await self._forget(token, family)
        log.info("batch lane %s: batch %s (%s) answered", family, token, batch_id)

    async def _hand_on(self, batch: _Batch, lines: list[Any]) -> None:
        members_key = self._keys.batch_members(batch.token)
        numbers = [line.custom_id.rsplit("-", 1)[1] for line in lines]
        task_ids = await self._redis.hmget(members_key, numbers)
        found = [(as_str(t), line) for t, line in zip(task_ids, lines, strict=True) if t]
        for i in range(0, len(found), _PARALLEL):  # a few connections, not one per line
            await asyncio.gather(
                *(self._hand_on_one(batch, t, line) for t, line in found[i : i + _PARALLEL])
            )

    async def _hand_on_one(self, batch: _Batch, task_id: str, line: Any) -> None:
        from pipeline.claude.api import answer_of

        token, family = batch.token, batch.family
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.sismember(self._keys.batch_unanswered(token), task_id)
            pipe.hget(self._keys.batch_shelf(family), task_id)
            pending, raw = await pipe.execute()
        if not pending or raw is None:
            # Handed on already; or this batch no longer holds the task (its results read
            # again after the id was answered and reused: the shelf's entry is another's).
            return
        shelved = _unpack(_bytes(raw))
        env = decode_envelope(shelved.envelope)
        routed = decode_body(env.body, Routed)
        assert isinstance(routed, Routed)
        message = line.message
        if line.kind != "succeeded" or message is None:
            reason = line.error_message or line.kind
            log.info("batch %s: task %s %s (%s): to the standard lane", token, task_id,
                     line.kind, reason)  # fmt: skip
            await self._to_standard(batch, task_id, line.kind)
            return
        try:
            answer = answer_of(message, routed)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("batch %s: task %s's message unreadable (%s): to the standard lane",
                        token, task_id, exc)  # fmt: skip
            await self._to_standard(batch, task_id, "unreadable")
            return
        # Batch rates, whatever the response says (it came through the Batches API).
        usage = msgspec.structs.replace(answer.usage, batch=True)
        answer = msgspec.structs.replace(answer, attempts=env.attempt, usage=usage)
        own = await self._records.record(task_id, routed, answer, shelved.fence)
        if own.state is ClaimState.CONFLICT:
            # The id holds another request's answer: claude-call refuses it properly (DLQ).
            await self._to_standard(batch, task_id, "conflict")
            return
        # GONE: the task's record lapsed while it waited (it outlives the lane's worst case,
        # so only a lane stalled longer): the answer is the task's all the same.
        mine = own.answer or answer
        await self._flights.republish(routed, task_id, mine)  # into the response cache
        fields = internal_entry(_onward(env, mine.to_store()))
        handed_ns = time.time_ns()  # before the store can take it: its span starts later
        if await self._deliver_one(batch, task_id, self._keys.stream("store"), fields):
            await self.budget.settle(shelved.reservation(routed), answer)
            self._released(batch, task_id, shelved, env, handed_ns, "answered", line.kind)

    async def _all_to_standard(self, batch: _Batch, task_ids: list[str], why: str) -> None:
        for i in range(0, len(task_ids), _PARALLEL):
            await asyncio.gather(
                *(self._to_standard(batch, t, why) for t in task_ids[i : i + _PARALLEL])
            )

    async def _to_standard(self, batch: _Batch, task_id: str, why: str) -> None:
        """Send a task its batch did not answer to the standard lane (`why`: errored,
        expired, canceled, missing, refused, …); its reservation is given back there."""
        raw = await self._redis.hget(self._keys.batch_shelf(batch.family), task_id)
        if raw is None:
            return
        shelved = _unpack(_bytes(raw))
        env = decode_envelope(shelved.envelope)
        fields = internal_entry(_onward(env, None))
        handed_ns = time.time_ns()
        if await self._deliver_one(batch, task_id, self._standard(batch.family), fields):
            await self.budget.release(shelved.reservation(_routed_of(shelved)))
            self._released(batch, task_id, shelved, env, handed_ns, "to_standard", why)

    async def _deliver_one(
        self, batch: _Batch, task_id: str, stream: str, fields: dict[str, str | bytes]
    ) -> bool:
        """Take the task off its batch and onto `stream`; False if it had left already."""
        keys = [
            self._keys.batch_unanswered(batch.token),
            self._keys.batch_shelf(batch.family),
            stream,
        ]
        flat: list[str | bytes] = [task_id]
        for name, value in fields.items():
            flat += (name, value)
        return as_int(await self._available.call(lambda: self._deliver(keys=keys, args=flat))) == 1

    def _released(
        self, batch: _Batch, task_id: str, shelved: Shelved, env: Any, handed_ns: int,
        outcome: str, why: str,
    ) -> None:  # fmt: skip
        """Tell the worker's hooks (metrics, tracing) a held task was handed on (at
        `handed_ns`)."""
        attributes = {"pipeline.batch.token": batch.token, "pipeline.batch.result": why}
        if batch.batch_id:
            attributes["pipeline.batch.id"] = batch.batch_id
        self._hooks.released(
            HeldReport(
                stage=self._stage,
                lane=batch.family,
                task_id=task_id,
                outcome=outcome,
                held_ns=shelved.shelved_ms * 1_000_000,
                released_ns=handed_ns,
                traceparent=env.traceparent,
                tracestate=env.tracestate,
                attributes=attributes,
            )
        )

    async def _unanswered(self, token: str) -> list[str]:
        return [as_str(m) for m in await self._redis.smembers(self._keys.batch_unanswered(token))]

    async def _forget(self, token: str, family: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem(self._keys.batches(family), token)
            pipe.delete(
                self._keys.batch(token),
                self._keys.batch_members(token),
                self._keys.batch_unanswered(token),
            )
            await pipe.execute()
        for memory in (self._polled, self._tries, self._not_before):
            memory.pop(token, None)

    async def _open(self, family: str) -> list[str]:
        return sorted(as_str(m) for m in await self._redis.smembers(self._keys.batches(family)))

    def _api(self) -> anthropic.AsyncAnthropic:
        if self._client is None:
            self._client = self._make_client()
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()


#: Far below the API's 256 MB per batch: a request's JSON is larger than its packed entry.
_MAX_BATCH_BYTES = 100 * 1024 * 1024
_UNDECIDED = object()
#: Take the ticket to create a batch: set `attempted_ms` only if it is still what this process
#: read (ARGV[1], '' for none), so two processes never both create it.
_TICKET = """
local current = redis.call('HGET', KEYS[1], 'attempted_ms') or ''
if current ~= ARGV[1] or redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'attempted_ms', ARGV[2])
return 1
"""


class _Batch(NamedTuple):
    """An open batch as its hand-on steps need it (`batch_id` "": never created)."""

    token: str
    batch_id: str
    family: str


class _LeadLost(Exception):
    """Another process leads the lane now: it takes the step up where this one stops."""


def _onward(env: Any, answer: Answer | None) -> Any:
    """The entry that carries a shelved task on: with its answer (to the store), or as it
    came (to the standard lane)."""
    body = None if answer is None else encode_body(answer)
    return onward(
        env, attempt=1, enqueued_ms=_now_ms(), trace=(env.traceparent, env.tracestate),
        origin_id=env.origin_id, body=body,
    )  # fmt: skip


def poll_interval_s(settings: Settings, age_s: float) -> float:
    """How long to wait between two looks at a batch `age_s` old: `poll_s` at first, then a
    twentieth of its age (most batches end within the hour; one a day old need not be asked
    about every 30 s), at most `poll_max_s`."""
    policy = settings.batch
    return max(policy.poll_s, min(policy.poll_max_s, age_s / 20))


def _routed_of(shelved: Shelved) -> Routed:
    routed = decode_body(decode_envelope(shelved.envelope).body, Routed)
    assert isinstance(routed, Routed)
    return routed


async def _first(lines: AsyncGenerator[Any, None]) -> Any:
    """The first item of an async generator, which is then closed (its connection too)."""
    async with contextlib.aclosing(lines):
        async for line in lines:
            return line
    return None


def _text_map(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {as_str(k): as_str(v) for k, v in raw.items()}


def _bytes(value: object) -> bytes:
    """A reply value: connections never decode replies."""
    if isinstance(value, bytes):
        return value
    raise TypeError(f"expected bytes from Redis, got {type(value).__name__}")


def _now_ms() -> int:
    return int(time.time() * 1000)
