"""Every Redis key the pipeline uses is named here, and nowhere else.

Keys of one partition share a hash tag (`<prefix>:{p3}:route`) so that each atomic hand-off
touches a single Cluster slot; that includes the result hash and the done stream, which the
last hand-off writes. With no partition (the default, one Redis node) keys carry
no tag: `<prefix>:tasks`, `<prefix>:route`, `<prefix>:call:haiku`, `<prefix>:store`.
"""

from __future__ import annotations

from pipeline.runtime.types import TaskId


class Keys:
    """Key names for one prefix (and optionally one partition)."""

    __slots__ = ("_base", "partition", "prefix")

    def __init__(self, prefix: str, partition: int | None = None) -> None:
        self.prefix = prefix
        self.partition = partition
        self._base = prefix if partition is None else f"{prefix}:{{p{partition}}}"

    def stream(self, name: str, lane: str | None = None) -> str:
        """A stage's input stream, e.g. `stream("call", "haiku")` -> `pipeline:call:haiku`."""
        return f"{self._base}:{name}" if lane is None else f"{self._base}:{name}:{lane}"

    def reclaim_clock(self, stream: str) -> str:
        """When `stream` was last reclaimed from, to tell a stalled Redis (same slot)."""
        return f"{stream}:clock"

    def delayed(self, stream: str) -> str:
        """The sorted set of entries waiting to go back onto `stream` (same slot as it)."""
        return f"{stream}:delayed"

    @property
    def ingress(self) -> str:
        """Where producers XADD tasks: `<prefix>:tasks`."""
        return self.stream("tasks")

    @property
    def dlq(self) -> str:
        return f"{self._base}:dlq"

    @property
    def dlq_bytes(self) -> str:
        """The bytes the DLQ's letters hold (its size bound counts them)."""
        return f"{self._base}:dlq:bytes"

    @property
    def done(self) -> str:
        """Completion events (trimmed); one stream per partition on Cluster."""
        return f"{self._base}:done"

    def result(self, task_id: TaskId | str) -> str:
        """`<prefix>:result:<id>`; on Cluster `<prefix>:{pN}:result:<id>`, in its partition's
        slot, so that the store's hand-off writes it in the same atomic step as its ack."""
        return f"{self._base}:result:{task_id}"

    def task(self, task_id: TaskId | str) -> str:
        """What the pipeline remembers of one task id while it is live and while its result
        lives (`pipeline.claude.task_record`): idempotency, the paid call's claim and answer, the
        ledger's mark. Same slot as the result, which expires it."""
        return f"{self._base}:task:{task_id}"

    def cache(self, request_hash: str) -> str:
        """A cached response, by canonical request hash. It shares its hash tag with the
        request's flights, so an answer lands in the cache and its flight in one step."""
        return f"{self.prefix}:cache:{{{request_hash}}}"

    @property
    def counters(self) -> str:
        """A hash of pipeline-wide counters (cache hits and misses, …)."""
        return f"{self.prefix}:counters"

    def ratelimit(self, key_id: str, family: str) -> str:
        """One (API key, model family)'s shared buckets, cool-down and counters (a hash).
        Every rate-limit key shares the `{rl}` hash tag: one admission script may weigh
        several API keys at once, on Cluster too."""
        return f"{self.prefix}:{{rl}}:{key_id}:{family}"

    @property
    def ratelimit_index(self) -> str:
        """The set of every `ratelimit` hash in use, so status never has to SCAN for them."""
        return f"{self.prefix}:{{rl}}:pairs"

    def slots(self, key_id: str) -> str:
        """One API key's concurrency slots: a sorted set of leases (member -> expiry ms)."""
        return f"{self.prefix}:{{rl}}:{key_id}:slots"

    def flight(self, request_hash: str, call: str) -> str:
        """Held (a lease) by the task leading the one call for identical requests in flight.
        `call` is what the request hash does not pin (the model and max_tokens sent). Every
        key of one flight shares the request's hash tag with its cache entry."""
        return f"{self.prefix}:flight:{{{request_hash}}}:{call}"

    def flight_led(self, request_hash: str, call: str) -> str:
        """The last task that began to lead the flight and has not landed it: outlives the
        lease, so that a task arriving after a leader died can look at its record."""
        return f"{self.prefix}:flight:{{{request_hash}}}:{call}:led"

    def flight_answer(self, request_hash: str, call: str) -> str:
        """The flight leader's answer, kept a few seconds for the tasks that followed it."""
        return f"{self.prefix}:flight:{{{request_hash}}}:{call}:answer"

    def budget(self, window: str) -> str:
        """Spend committed in one budget window (a UTC day): settled costs + reservations."""
        return f"{self.prefix}:budget:{window}"

    def ledger(self, day: str) -> str:
        """One UTC day's cost ledger (a hash of `<model>|<type>|<metric>` counters)."""
        return f"{self._base}:ledger:{day}"

    def batch_shelf(self, family: str) -> str:
        """Tasks held by the batch lane (task id -> its entry), from arrival until their answer
        is handed on: the durable place a batched task waits, instead of a pending list."""
        return f"{self.prefix}:batch:shelf:{family}"

    def batch_queue(self, family: str) -> str:
        """Shelved tasks not yet in a batch (a sorted set: task id -> ms it arrived)."""
        return f"{self.prefix}:batch:queue:{family}"

    def batches(self, family: str) -> str:
        """The tokens of one lane's open batches (a set)."""
        return f"{self.prefix}:batch:open:{family}"

    def batch(self, token: str) -> str:
        """One batch: its state, API id, size and times (a hash)."""
        return f"{self.prefix}:batch:{token}"

    def batch_members(self, token: str) -> str:
        """One batch's requests by number (n -> task id); `n` is the tail of the custom_id."""
        return f"{self.prefix}:batch:{token}:members"

    def batch_unanswered(self, token: str) -> str:
        """The task ids of one batch not yet handed on (a set): each leaves it exactly once."""
        return f"{self.prefix}:batch:{token}:unanswered"

    def batch_leader(self, family: str) -> str:
        """Held (a lease) by the one process forming and polling one lane's batches."""
        return f"{self.prefix}:batch:leader:{family}"

    def pause(self, stage: str) -> str:
        """Set while a stage is paused (for example by refused credentials)."""
        return f"{self._base}:pause:{stage}"

    def worker(self, consumer: str) -> str:
        """Held by the live process using this consumer name, so no two processes share it."""
        return f"{self.prefix}:worker:{consumer}"

    def app_key(self, name: str) -> str:
        """A key for an App's own bookkeeping, inside the prefix (tests, custom stages)."""
        return f"{self._base}:app:{name}"

    def pattern(self) -> str:
        """A SCAN pattern matching every key of this prefix (tests and purge)."""
        return f"{self.prefix}:*"
