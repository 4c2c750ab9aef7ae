"""The `Client` class: submits tasks in all-or-nothing transactions under a backlog cap, and
reads results (waiting through `pipeline.client.waiting`).

One node or a Redis Cluster: the client asks the node `redis_url` names (`INFO cluster`) when
it first talks to Redis, and on a Cluster uses a `RedisCluster` for every command and for the
done-stream reader. What it touches is the same either way: XADD to `<prefix>:tasks` (one
MULTI/EXEC per batch, on one key: one slot), `<prefix>:result:<id>` and `<prefix>:done`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Self, cast

import msgspec
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, BusyLoadingError, ResponseError

from pipeline.claude.config import load_settings
from pipeline.claude.settings import IngressSettings, Settings
from pipeline.client.errors import SubmitFailed
from pipeline.client.fields import task_fields, with_id
from pipeline.client.waiting import DoneWatcher, HashLookups
from pipeline.runtime.deployment import partitions_for
from pipeline.runtime.errors import Backpressure, ConfigError, InvalidTask, RedisUnavailable
from pipeline.runtime.keys import Keys
from pipeline.runtime.redis_conn import (
    UNAVAILABLE,
    cluster_enabled,
    connect_cluster,
    is_cluster,
    node_client,
    redacted,
)
from pipeline.runtime.settings import RedisSettings

__all__ = ["BATCH_SIZE", "Client"]

#: Tasks per `submit_many` call (one MULTI/EXEC each) for callers that split a long input,
#: such as `pipeline submit --file`.
BATCH_SIZE = 500
_PREFIX = re.compile(r"[A-Za-z0-9_.\-]+")


class Client:
    """Submit tasks and fetch results; one per process is plenty (it is safe to share).

    With no arguments it is configured as the workers and the CLI are: `PIPELINE_CONFIG`
    (a TOML file), `REDIS_URL`, `PIPELINE_PREFIX` and `PIPELINE_<SECTION>__<FIELD>`.

    Args:
        redis_url: `redis://`, `rediss://` or `unix://`; a password in the URL works.
            Default: the settings' (`REDIS_URL`, else `redis://localhost:6379/0`).
        prefix: the pipeline's key prefix. Default: the settings' (`PIPELINE_PREFIX`, else
            `pipeline`).
        ingress: input bounds and the backlog cap. Default: the settings' `[ingress]`.
        name: the Redis client name of every connection this client opens (`CLIENT LIST`).
        max_connections: commands wait for a free connection beyond this many (default: the
            settings' `[redis]`, as are the timeouts). On a Cluster this many per node,
            and a command beyond them fails (`RedisUnavailable`) instead of waiting.
        backlog_check_s: how long a measured ingress length is trusted; see `submit`.
        done_block_ms: the done-stream reader's XREAD BLOCK (its socket timeout is longer).
        settings: everything else tasks are validated with (`validate_request`: model
            aliases, limits). Default: read from the environment as above (a bad value
            raises `ConfigError`). The arguments above win over it.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        prefix: str | None = None,
        *,
        ingress: IngressSettings | None = None,
        name: str | None = None,
        max_connections: int | None = None,
        connect_timeout_s: float | None = None,
        socket_timeout_s: float | None = None,
        backlog_check_s: float = 0.1,
        done_block_ms: int = 5000,
        settings: Settings | None = None,
    ) -> None:
        base = load_settings() if settings is None else settings
        redis_url = base.redis.url if redis_url is None else redis_url
        prefix = base.prefix if prefix is None else prefix
        if not _PREFIX.fullmatch(prefix):
            raise ConfigError("prefix", f"only letters, digits, '_', '-', '.' allowed: {prefix!r}")
        self.keys = Keys(prefix)
        self.settings = msgspec.structs.replace(
            base,
            prefix=prefix,
            redis=msgspec.structs.replace(base.redis, url=redis_url),
            ingress=ingress or base.ingress,
        )
        connect_timeout_s = connect_timeout_s or base.redis.connect_timeout_s
        socket_timeout_s = socket_timeout_s or base.redis.socket_timeout_s
        self.limits: IngressSettings = self.settings.ingress
        self.name = name or f"pipeline-client-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._url = redis_url
        self._max_connections = max_connections or base.redis.max_connections
        self._timeouts = (connect_timeout_s, socket_timeout_s)
        #: One node's client until the first command finds a Cluster (`RedisCluster` then).
        self.redis = node_client(
            redis_url,
            max_connections=self._max_connections,
            pool_timeout=None,  # wait for a free connection rather than fail a burst
            client_name=self.name,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
        )
        self._reader_redis = node_client(
            redis_url,
            max_connections=1,  # one blocking read at a time
            pool_timeout=None,
            client_name=self.name,
            socket_timeout=done_block_ms / 1000 + socket_timeout_s,  # longer than the block
            socket_connect_timeout=connect_timeout_s,
        )
        self._done_block_ms = done_block_ms
        self._backlog_check_s = backlog_check_s
        self._backlog = 0
        self._backlog_at = -math.inf
        self._backlog_lock = asyncio.Lock()
        self._lookups = HashLookups(self.redis)
        self._watcher: DoneWatcher | None = None
        self._watcher_lock = asyncio.Lock()
        self._opened = False
        self._open_lock = asyncio.Lock()

    async def _open(self) -> None:
        """Find out, once, whether the URL names a Cluster node, and if so switch to Cluster
        clients; either way `keys` become the deployment's (its partitions, which only the
        runtime's keys use: producers' keys are the same)."""
        if self._opened:
            return
        async with self._open_lock:
            if self._opened:
                return
            connect_s, socket_s = self._timeouts
            probe = msgspec.structs.replace(
                self.settings.redis, connect_timeout_s=connect_s, socket_timeout_s=socket_s
            )
            try:
                cluster = await cluster_enabled(probe)
            except ResponseError:  # INFO refused (a producer's ACL user): a node, as before
                cluster = False
            if cluster:
                await self._use_cluster(probe)
            self.keys = Keys(self.keys.prefix, partitions=partitions_for(self.settings, cluster))
            self._opened = True

    async def _use_cluster(self, settings: RedisSettings) -> None:
        """Cluster clients in place of the one-node ones (which never sent a command)."""
        commands = connect_cluster(
            settings, max_connections=self._max_connections, client_name=self.name
        )
        try:
            await commands.initialize()  # the nodes and their slots, read once here
        except BaseException:
            await commands.aclose()
            raise
        reader = connect_cluster(
            settings,
            client_name=self.name,
            socket_timeout=self._done_block_ms / 1000 + settings.socket_timeout_s,
        )
        plain, plain_reader = self.redis, self._reader_redis
        self.redis = cast(Redis, commands)  # the same commands; keys one slot each
        self._reader_redis = cast(Redis, reader)
        self._lookups = HashLookups(self.redis)
        await plain.aclose(close_connection_pool=True)
        await plain_reader.aclose()

    @classmethod
    def from_settings(cls, settings: Settings, *, name: str | None = None) -> Client:
        """A client for the Redis, prefix, ingress limits and connection settings of
        `settings` (what `Client(settings=settings)` does)."""
        return cls(name=name, settings=settings)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the done-stream reader, fail its waiters, close every connection."""
        if self._watcher is not None:
            await self._watcher.aclose()
            self._watcher = None
        await self._reader_redis.aclose()
        if is_cluster(self.redis):
            await self.redis.aclose()
        else:
            await self.redis.aclose(close_connection_pool=True)

    # ---- submitting ----------------------------------------------------------------------

    async def submit(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, object]] | str | None = None,
        system: str | None = None,
        model: str = "auto",
        max_tokens: int | None = None,
        temperature: float | None = None,
        type: str = "default",
        id: str | None = None,
        cache: bool = True,
        batch: bool | None = None,
        deadline: int | None = None,
        ttl: int | None = None,
        metadata: Mapping[str, object] | str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
        tools: Sequence[Mapping[str, object]] | str | None = None,
        tool_choice: Mapping[str, object] | str | None = None,
        thinking: Mapping[str, object] | str | None = None,
        stop_sequences: Sequence[str] | str | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        service_tier: str | None = None,
        output_format: Mapping[str, object] | str | None = None,
        cache_control: Mapping[str, object] | str | None = None,
        user_id: str | None = None,
        params: Mapping[str, object] | str | None = None,
    ) -> str:
        """Add one task to the ingress and return its id: `id`, else a new `uuid4().hex`.

        The Messages parameters (`tools` … `user_id`) and `params` (any other one) are sent
        as the API takes them, as Python values or their JSON text (DESIGN: wire format).

        The task is sent with its id either way, so it can be sent again safely: if this
        raises `SubmitFailed`, `submit(..., id=exc.ids[0])` with the same arguments (or
        `submit_many(exc.tasks)`) adds it at most once, whether or not the first try landed.

        The backlog check trusts a measured ingress length for `backlog_check_s` (0.1 s),
        counting this client's own additions on top, and measures again before refusing: one
        XLEN per 100 ms instead of one per task, at the cost of letting other producers
        overshoot the cap by what they add in 100 ms (the cap is a safety limit, not a quota).

        Raises:
            InvalidTask: the task is malformed (the message names the field).
            Backpressure: the ingress already holds `ingress.max_backlog` tasks.
            SubmitFailed: (a `RedisUnavailable`) Redis could not be reached, refused the
                task, or the connection failed with it in flight; see `maybe_added`.
        """
        fields = task_fields(
            {
                "prompt": prompt,
                "messages": messages,
                "system": system,
                "model": model,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "type": type,
                "id": id,
                "cache": cache,
                "batch": batch,
                "deadline": deadline,
                "ttl": ttl,
                "metadata": metadata,
                "traceparent": traceparent,
                "tracestate": tracestate,
                "tools": tools,
                "tool_choice": tool_choice,
                "thinking": thinking,
                "stop_sequences": stop_sequences,
                "top_p": top_p,
                "top_k": top_k,
                "service_tier": service_tier,
                "output_format": output_format,
                "cache_control": cache_control,
                "user_id": user_id,
                "params": params,
            },
            self.settings,
        )
        return (await self._add([with_id(fields)]))[0]

    async def submit_many(self, tasks: Iterable[Mapping[str, object]]) -> list[str]:
        """Add many tasks (mappings with `submit`'s keyword names) at once, all or nothing.

        Every task is validated, and room for all of them is checked, before anything is
        sent; then they go in one MULTI/EXEC, which Redis carries out whole or not at all
        (a command it refuses part way, say for `maxmemory`, aborts the lot). Returns the
        task ids in order: each task's `id`, else a new `uuid4().hex` assigned before
        sending.

        Safe to retry: on `SubmitFailed`, `submit_many(exc.tasks)` sends the identical batch
        again (same ids). If the first try did land (`exc.maybe_added`: the connection died
        after the EXEC went out), its tasks are each run and answered once all the same; the
        second copies are dropped with no call and no second result. Ids chosen by the
        caller make the same hold across restarts of the caller itself.

        One call is one transaction that Redis runs in one go: split very large inputs
        (`BATCH_SIZE` tasks per call is a good size).

        Raises:
            InvalidTask: naming the task's position (from 0) and the field.
            Backpressure: the ingress has no room for all of them (none was sent).
            SubmitFailed: (a `RedisUnavailable`) Redis could not be reached, refused the
                batch (none added), or the connection failed with it in flight (all or none
                added); carries the batch with its ids.
        """
        batch: list[dict[str, str]] = []
        for n, task in enumerate(tasks):
            try:
                batch.append(with_id(task_fields(task, self.settings)))
            except InvalidTask as exc:
                raise InvalidTask(f"task {n}: {exc}") from None
        return await self._add(batch) if batch else []

    async def backlog(self) -> int:
        """The ingress length now (tasks no stage has taken yet)."""
        async with self._errors():
            await self._open()
            return int(await self.redis.xlen(self.keys.ingress))

    async def _add(self, tasks: list[dict[str, str]]) -> list[str]:
        """Send `tasks` (each with its id) in one transaction; return their ids."""
        try:
            await self._reserve_room(len(tasks))
        except RedisUnavailable as exc:
            raise SubmitFailed(
                f"{str(exc).rstrip('.')}; none of the {len(tasks):,} task(s) was sent",
                tasks,
                maybe_added=False,
            ) from exc
        try:
            await self._send(tasks)
        except SubmitFailed:
            self._backlog_at = -math.inf  # what we counted as ours may not be there
            raise
        return [fields["id"] for fields in tasks]

    async def _send(self, tasks: list[dict[str, str]]) -> None:
        n = len(tasks)
        where = redacted(self._url)
        # The spans write their own trace context into what is sent; `tasks` stay as given,
        # so a retry of them starts its own send spans under the caller's context.
        sending = [dict(fields) for fields in tasks]
        try:
            with _producer_spans(self.keys.ingress, sending) as sent:
                async with self.redis.pipeline(transaction=True) as pipe:
                    for fields in sending:
                        pipe.xadd(self.keys.ingress, fields)  # type: ignore[arg-type]
                    replies = await pipe.execute(raise_on_error=False)
                errors = [r for r in replies if isinstance(r, Exception)]
                if errors:  # EXEC ran and failed XADDs in it (on one key, it fails them all)
                    landed = n - len(errors)
                    raise SubmitFailed(
                        f"Redis at {where} refused {len(errors):,} of {n:,} task(s) "
                        f"({errors[0]}); {landed:,} were added",
                        tasks,
                        maybe_added=landed > 0,
                    )
                sent(replies)
        except (ResponseError, BusyLoadingError, AuthenticationError) as exc:
            # An error reply: Redis refused the handshake, or a command before EXEC ran, so
            # it discarded the whole transaction (`maxmemory` is checked as each command is
            # queued and again at EXEC). Nothing was added.
            raise SubmitFailed(
                f"Redis at {where} refused the batch ({type(exc).__name__}: {exc}); none of "
                f"its {n:,} task(s) was added",
                tasks,
                maybe_added=False,
            ) from exc
        except UNAVAILABLE as exc:
            raise SubmitFailed(
                f"cannot reach Redis at {where}: {str(exc).rstrip('.')}; the connection failed "
                f"with {n:,} task(s) in flight, so all or none of them were added: send "
                "exc.tasks again (same ids: a copy that is already in is dropped, not run twice)",
                tasks,
                maybe_added=True,
            ) from exc

    async def _reserve_room(self, n: int) -> None:
        limit = self.limits.max_backlog
        async with self._backlog_lock:
            measured_now = False
            if time.monotonic() - self._backlog_at > self._backlog_check_s:
                await self._measure_backlog()
                measured_now = True
            if self._backlog + n > limit and not measured_now:
                await self._measure_backlog()  # never refuse on a stale number
            if self._backlog + n > limit:
                raise Backpressure(
                    f"the ingress holds {self._backlog:,} tasks; {n:,} more would pass "
                    f"ingress.max_backlog ({limit:,}): slow down and retry later"
                )
            self._backlog += n  # ours, until the next measurement

    async def _measure_backlog(self) -> None:
        self._backlog = await self.backlog()
        self._backlog_at = time.monotonic()

    # ---- results -------------------------------------------------------------------------

    async def result(self, task_id: str, wait: float | None = None) -> dict[str, str] | None:
        """The task's result hash, or None if there is none (yet).

        With `wait` (seconds), wait up to that long for the task to complete. Waiting costs no
        Redis traffic of its own: the client's one done-stream reader wakes the waiter.
        """
        if not isinstance(task_id, str) or not task_id:
            raise InvalidTask("task id must be a non-empty string")
        key = self.keys.result(task_id)
        if not wait or wait <= 0:
            return await self._lookup(key)
        watcher = await self._done_watcher()
        # Register before looking, and the reader's position is older than both: a completion
        # is then either already in the hash, or an event the reader has yet to see.
        event = watcher.register(task_id)
        try:
            found = await self._lookup(key)
            if found is not None:
                return found
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await event
            # One more look either way: an event can be trimmed away while the reader is down.
            return await self._lookup(key)
        finally:
            watcher.unregister(task_id, event)

    @property
    def waiting(self) -> int:
        """How many `result(…, wait=…)` calls are waiting now."""
        return self._watcher.waiting if self._watcher is not None else 0

    async def _lookup(self, key: str) -> dict[str, str] | None:
        async with self._errors():
            await self._open()
            raw = await self._lookups.hgetall(key)
        if not raw:
            return None
        return {k.decode(): v.decode(errors="replace") for k, v in raw.items()}

    async def _done_watcher(self) -> DoneWatcher:
        async with self._watcher_lock:
            if self._watcher is None:
                async with self._errors():
                    await self._open()
                    watcher = DoneWatcher(self._reader_redis, self.keys.done, self._done_block_ms)
                    await watcher.start()
                self._watcher = watcher
            return self._watcher

    @contextlib.asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        """Redis being away becomes one clear `RedisUnavailable` naming the (redacted) URL."""
        try:
            yield
        except UNAVAILABLE as exc:
            raise RedisUnavailable(f"cannot reach Redis at {redacted(self._url)}: {exc}") from exc


_NO_SPANS: contextlib.nullcontext[Callable[[Sequence[bytes]], None]] = contextlib.nullcontext(
    lambda entry_ids: None
)


def _producer_spans(
    stream: str, tasks: Sequence[dict[str, str]]
) -> contextlib.AbstractContextManager[Callable[[Sequence[bytes]], None]]:
    """`send` PRODUCER spans whose context goes into the tasks' traceparent, when this
    process has set up OpenTelemetry (never imported here otherwise)."""
    if "opentelemetry.trace" not in sys.modules:
        return _NO_SPANS
    from observability.propagation import producer_spans

    return producer_spans(stream, tasks)
