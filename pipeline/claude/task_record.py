"""A task's record: what the pipeline remembers of one task id, and the model of a paid call.

One hash per task id, `<prefix>:task:<id>`, created when the task first needs it and expiring
with the task's result (the hand-off that stores the result sets both TTLs in one step), so an
id is an idempotency key exactly as long as its result can be read (the "Paid work is done once"
guarantee). Its fields:

- `fp`, `entry`: for a task whose producer chose its id, a fingerprint of what the producer
  sent and the ingress entry that owns the id. Another entry with that id is a harmless
  duplicate (same fingerprint: dropped) or refused (another request under a live id).
- `holder`, `fence`: the claim on the task's paid call, taken before the call. It names the
  stream entry that holds it (`Lease.token`), so it is renewed with that entry's lease at no
  cost of its own, and it lapses when the entry is acknowledged, reclaimed by another
  worker, or its worker dies or stalls past the lease. `fence` numbers the claims.
- `req`, `answer`: the answer the call got (without the request's content) and the call it
  answered (`binding`: request hash, model and max_tokens), checked on every read: a
  recorded answer is only ever handed on for the call it answered.
- `paid:<fence>`: the ledger has counted the call paid for under claim `fence` (a resend
  after a lost reply counts nothing twice).
- `counted`: the ledger has counted the task (`pipeline.claude.ledger`).

The only paid duplicates left are answers that died with a killed process (the call was made
but never recorded) and calls of a process stalled past its lease (its claim lapsed and
another worker called; both answers are counted in the ledger, the first recorded is the
task's).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec
from redis.asyncio import Redis
from redis.typing import EncodableT

from pipeline.claude.ledger import CALL_METRICS, Ledger
from pipeline.claude.request import request_hash
from pipeline.claude.scripts import load
from pipeline.claude.settings import Settings
from pipeline.claude.task import Answer, Routed
from pipeline.runtime.keys import Keys
from pipeline.runtime.redis_conn import Availability
from pipeline.runtime.replication import Replication
from pipeline.runtime.replies import as_int, as_list
from pipeline.runtime.services import Services
from pipeline.runtime.stage import Message

#: Producer fields that may differ between two submissions of one request (each try of a
#: producer starts a new trace), so they are not part of its fingerprint.
UNFINGERPRINTED = frozenset({"traceparent", "tracestate"})

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Answer).decode


class Admission(enum.Enum):
    NEW = 0  # the id is this entry's (or was free)
    DUPLICATE = 1  # another entry owns the id with the same request
    CONFLICT = 2  # another entry owns the id with another request


class ClaimState(enum.Enum):
    CLAIMED = 0  # call now
    RECORDED = 1  # the answer is recorded: hand it on
    HELD = 2  # another live entry of this task is calling
    CONFLICT = 3  # the id's answer is for another request
    GONE = 4  # (record only) the task was answered and its record expired meanwhile


@dataclass(frozen=True, slots=True)
class Claim:
    state: ClaimState
    answer: Answer | None = None  # RECORDED: the recorded answer, as this request's
    fence: int = 0  # CLAIMED: the claim's number


def fingerprint(fields: Mapping[str, str]) -> str:
    """A hash of everything a producer sent but its trace context, in any field order."""
    digest = hashlib.sha256()
    for name in sorted(fields):
        if name not in UNFINGERPRINTED:
            digest.update(f"{len(name)}:{name}{len(fields[name])}:".encode())
            digest.update(fields[name].encode())
    return digest.hexdigest()[:32]


def binding(routed: Routed) -> str:
    """What a recorded answer answered: the request's canonical hash (`request_hash`) and
    the model and max_tokens the task was routed to (before any budget downgrade, which is
    the task's own call either way)."""
    request = routed.request
    canonical = request.request_hash or request_hash(request, None)  # a hand-built request
    return f"{canonical}:{routed.model}:{routed.max_tokens}"


class TaskRecords:
    """The task records of one worker process."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        available: Availability,
        ledger: Ledger,
        live_ttl_s: int,
        lease_ms: int,
        replication: Replication | None = None,
    ) -> None:
        """`replication`: with replicated durability, a paid answer's record waits for a
        replica (a primary lost before it would otherwise make the call be paid again)."""
        self.keys = keys
        self._replication = replication
        self._available = available
        self._ledger = ledger
        self._live_ttl_s = live_ttl_s
        self._lease_ms = lease_ms
        self._admit = load(redis, "task_admit")
        self._claim = load(redis, "call_claim")
        self._record = load(redis, "call_record", after="ledger_add")

    @classmethod
    def for_stage(cls, services: Services[Settings], stage: str) -> TaskRecords:
        """The records as `stage`'s handlers use them (claims last that stage's lease)."""
        settings = services.settings
        return cls(
            services.redis, services.keys, services.available, services.shared(Ledger.for_services),
            settings.results.live_ttl_s, settings.runtime_for(stage).lease_ms,
            services.replication,
        )  # fmt: skip

    async def admit(self, task_id: str, fields: Mapping[str, str], entry_id: str) -> Admission:
        """Take the id for this ingress entry, or tell what the id already stands for."""
        keys = [self.keys.task(task_id)]
        args: list[EncodableT] = [fingerprint(fields), entry_id, self._live_ttl_s]
        reply = await self._available.call(lambda: self._admit(keys=keys, args=args))
        return Admission(as_int(reply))

    async def claim(self, msg: Message, routed: Routed) -> Claim:
        """Claim the task's paid call for this entry, before it is made."""
        lease = msg.lease
        keys = [self.keys.task(msg.task_id), *([lease.stream] if lease else [])]
        args: list[EncodableT] = [
            binding(routed), msg.lease_token(), self._lease_ms, self._live_ttl_s,
        ]  # fmt: skip
        reply = as_list(await self._available.call(lambda: self._claim(keys=keys, args=args)))
        state = ClaimState(as_int(reply[0]))
        if state is ClaimState.RECORDED:
            return Claim(state, answer=self._as_own(reply[1], routed))
        if state is ClaimState.CLAIMED:
            return Claim(state, fence=as_int(reply[1]))
        return Claim(state)

    async def record(self, task_id: str, routed: Routed, answer: Answer, fence: int = 0) -> Claim:
        """Record `answer` as the task's. `fence`: the claim under which it was paid for (0:
        not paid, e.g. coalesced); a paid call is counted in the ledger in the same step,
        once per claim even if this is sent again after a lost reply. Returns RECORDED with
        the task's answer: this one, or one recorded first for the same call (a worker that
        stalled past its lease answered too); CONFLICT if the id's answer is for another
        request; GONE if the task's record expired while the call ran.

        Waits out a Redis outage rather than fail: a failure here would pay again.
        """
        day_key, ledger_args = self.keys.ledger("-", task_id), list[EncodableT]()
        if fence and self._ledger.enabled:
            day_key, ledger_args = self._ledger.add_args(
                self._ledger.charge(answer).part(CALL_METRICS), tasks=0, task_id=task_id
            )
        keys = [self.keys.task(task_id), day_key]
        args: list[EncodableT] = [
            binding(routed), _encode(answer.bare()), self._live_ttl_s,
            fence if ledger_args else 0, *ledger_args,
        ]  # fmt: skip

        async def record() -> list[object]:
            return as_list(await self._available.call(lambda: self._record(keys=keys, args=args)))

        if fence and self._replication is not None:  # a paid answer: in a replica before on
            reply = await self._replication.write(record, keys[0])
        else:
            reply = await record()
        status = as_int(reply[0])
        if status == 0:
            return Claim(ClaimState.RECORDED, answer=answer)
        if status == 1:
            return Claim(ClaimState.RECORDED, answer=self._as_own(reply[1], routed))
        return Claim(ClaimState.CONFLICT if status == 2 else ClaimState.GONE)

    @staticmethod
    def _as_own(packed: object, routed: Routed) -> Answer:
        """A recorded answer with this entry's request (content and metadata) put back."""
        if not isinstance(packed, bytes):
            raise TypeError(f"expected bytes from Redis, got {type(packed).__name__}")
        return msgspec.structs.replace(_decode(packed), request=routed.request)
