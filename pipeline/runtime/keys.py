"""Every Redis key the pipeline uses is named here, and nowhere else.

On one Redis node (the default, `partitions` 0) keys carry no hash tag: `<prefix>:tasks`,
`<prefix>:route`, `<prefix>:call:haiku`, `<prefix>:store`.

With `partitions` N (required on a Redis Cluster), each stage's streams exist N times, and
everything one atomic hand-off touches carries its partition's hash tag, so it lies in one
Cluster slot: `<prefix>:{p3}:route`, its delayed set, the task's record, its partition's
result copy, done stream and DLQ. A task's partition follows from its id alone (so copies of
one id always meet): `CLUSTER KEYSLOT <id>` mod N (`partition_of`). What producers touch does
not move: they XADD `<prefix>:tasks` and read `<prefix>:result:<id>` and `<prefix>:done`;
the runtime moves each task into its partition and publishes each result back
(`pipeline.runtime.partitions`).
"""

from __future__ import annotations

from redis.crc import key_slot

from pipeline.runtime.types import TaskId


class Keys:
    """Key names for one prefix: the whole deployment, or one partition of it."""

    __slots__ = ("_base", "partition", "partitions", "prefix")

    def __init__(self, prefix: str, partition: int | None = None, partitions: int = 0) -> None:
        """`partitions`: how many the deployment has (0: none, one node's layout);
        `partition`: which one these keys name (None: the deployment as a whole)."""
        if partitions and partition is not None and not 0 <= partition < partitions:
            raise ValueError(f"partition {partition} of {partitions}")
        self.prefix = prefix
        self.partitions = partitions
        self.partition = partition
        self._base = prefix if partition is None else f"{prefix}:{{p{partition}}}"

    # ---- partitions ------------------------------------------------------------------------

    def partition_of(self, task_id: TaskId | str) -> int | None:
        """The partition a task id belongs to (None without partitions): the id's Cluster
        slot, mod the partition count, so a producer in any language can tell
        (`CLUSTER KEYSLOT <id>`)."""
        if not self.partitions:
            return None
        return int(key_slot(str(task_id).encode())) % self.partitions

    def of_partition(self, partition: int) -> Keys:
        return Keys(self.prefix, partition, self.partitions)

    def for_task(self, task_id: TaskId | str) -> Keys:
        """The keys of the partition `task_id` belongs to (these keys without partitions)."""
        partition = self.partition_of(task_id)
        if partition is None or partition == self.partition:
            return self
        return self.of_partition(partition)

    def owns(self, key: str) -> bool:
        """Whether `key` is one of these keys: of this partition (so in its slot), or, for
        the deployment as a whole, of this prefix."""
        return key.startswith(f"{self._base}:")

    def each_partition(self) -> list[Keys]:
        """One Keys per partition; without partitions, just these."""
        if not self.partitions:
            return [self]
        return [self.of_partition(p) for p in range(self.partitions)]

    # ---- streams ---------------------------------------------------------------------------

    def stream(self, name: str, lane: str | None = None) -> str:
        """A stage's input stream, e.g. `stream("call", "haiku")` -> `pipeline:call:haiku`
        (`pipeline:{p3}:call:haiku` in partition 3)."""
        return f"{self._base}:{name}" if lane is None else f"{self._base}:{name}:{lane}"

    def reclaim_clock(self, stream: str) -> str:
        """When `stream` was last reclaimed from, to tell a stalled Redis (same slot)."""
        return f"{stream}:clock"

    def delayed(self, stream: str) -> str:
        """The sorted set of entries waiting to go back onto `stream` (same slot as it)."""
        return f"{stream}:delayed"

    @property
    def ingress(self) -> str:
        """Where producers XADD tasks: `<prefix>:tasks`, whatever the partitions (the first
        stage reads it on one node; with partitions, the runtime moves each task from it
        into its partition's `stream("tasks")`)."""
        return f"{self.prefix}:tasks"

    def moved(self, entry_id: str) -> str:
        """Marks an ingress entry moved into this partition (so a move redone after a crash
        adds nothing): same slot as the partition's streams."""
        return f"{self._base}:moved:{entry_id}"

    @property
    def dlq(self) -> str:
        return f"{self._base}:dlq"

    @property
    def dlq_bytes(self) -> str:
        """The bytes the DLQ's letters hold (its size bound counts them)."""
        return f"{self._base}:dlq:bytes"

    @property
    def done(self) -> str:
        """Completion events producers wait on: `<prefix>:done` (trimmed)."""
        return f"{self.prefix}:done"

    def result(self, task_id: TaskId | str) -> str:
        """`<prefix>:result:<id>`: the result producers read, whatever the partitions."""
        return f"{self.prefix}:result:{task_id}"

    @property
    def landed(self) -> str:
        """Where the last hand-off announces a result: `done` itself on one node; with
        partitions, this partition's queue of results to publish (never trimmed: each event
        is deleted once its result is published)."""
        return self.done if self.partition is None else f"{self._base}:done"

    def landing(self, task_id: TaskId | str) -> str:
        """Where the last hand-off writes a task's result, first writer wins: `result` on one
        node; with partitions, a copy in the task's partition (the same slot as the ack),
        which is then published to `result`."""
        keys = self.for_task(task_id)
        if keys.partition is None:
            return self.result(task_id)
        return f"{keys._base}:result:{task_id}"

    def task(self, task_id: TaskId | str) -> str:
        """What the pipeline remembers of one task id while it is live and while its result
        lives (`pipeline.claude.task_record`): idempotency, the paid call's claim and answer, the
        ledger's mark. In the task's partition, the slot of its hand-offs."""
        return f"{self.for_task(task_id)._base}:task:{task_id}"

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

    def ledger(self, day: str, task_id: TaskId | str | None = None) -> str:
        """One UTC day's cost ledger (a hash of `<model>|<type>|<metric>` counters); with
        partitions, one per partition (that of `task_id`, whose record it is written with),
        summed when read."""
        keys = self if task_id is None else self.for_task(task_id)
        return f"{keys._base}:ledger:{day}"

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
        return f"{self.prefix}:pause:{stage}"

    @property
    def layout(self) -> str:
        """The number of partitions the deployment's streams are laid out in, set by its
        first worker (`pipeline.runtime.deployment.check_layout`)."""
        return f"{self.prefix}:layout:partitions"

    def worker(self, consumer: str) -> str:
        """Held by the live process using this consumer name, so no two processes share it."""
        return f"{self.prefix}:worker:{consumer}"

    def app_key(self, name: str) -> str:
        """A key for an App's own bookkeeping, inside the prefix (tests, custom stages)."""
        return f"{self._base}:app:{name}"

    def pattern(self) -> str:
        """A SCAN pattern matching every key of this prefix (tests and purge)."""
        return f"{self.prefix}:*"
