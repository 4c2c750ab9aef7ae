"""The producer's side: submit tasks to the ingress, read results, wait for them.

Guarantee 8 starts here: a bad request is refused with a message that says what is wrong
(`InvalidTask`) before anything reaches Redis, and a full ingress refuses new work
(`Backpressure`) instead of growing without bound.

A submit is all or nothing, and safe to send again. Every task leaves with an `id` (the
caller's, else a fresh `uuid4().hex`), which the pipeline treats as an idempotency key, and
each `submit`/`submit_many` call is one MULTI/EXEC: Redis adds all of its tasks or none. When
a call fails, `SubmitFailed` carries the exact tasks it sent, ids included: sending them again
adds nothing twice, whether or not the first try landed (a copy that did is dropped by the
cache-check stage, with no second call and no second result).

Waiting does not poll. One background reader per `Client` follows the `done` stream with
`XREAD BLOCK` and wakes the waiters of the task ids it sees, so thousands of concurrent
`result(id, wait=…)` calls share one connection; the hash reads they then make are batched
into pipelined round trips on one more.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
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
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import AuthenticationError, BusyLoadingError, RedisError, ResponseError

from pipeline.claude.request import validate_request
from pipeline.claude.settings import IngressSettings, Settings
from pipeline.runtime.errors import Backpressure, ConfigError, InvalidTask, RedisUnavailable
from pipeline.runtime.keys import Keys
from pipeline.runtime.redis_conn import UNAVAILABLE, redacted
from pipeline.runtime.traceparent import valid as valid_traceparent
from pipeline.runtime.wire import MAX_TASK_ID_CHARS

log = logging.getLogger(__name__)

#: The producer fields of DESIGN's wire format, in the order they are written.
WIRE_FIELDS = (
    "prompt",
    "messages",
    "system",
    "model",
    "max_tokens",
    "temperature",
    "type",
    "id",
    "cache",
    "ttl",
    "metadata",
    "traceparent",
    "tracestate",
)
#: Tasks per `submit_many` call (one MULTI/EXEC each) for callers that split a long input,
#: such as `pipeline submit --file`.
BATCH_SIZE = 500
#: Fields a Python caller may give as Python values, and the types each one takes; strings (the
#: wire form) are taken for every field. JSON-valued fields are sent as compact JSON text.
_JSON_FIELDS: dict[str, type | tuple[type, ...]] = {
    "messages": list,
    "system": list,
    "metadata": Mapping,
}
_NUMBER_FIELDS = frozenset({"max_tokens", "temperature", "ttl"})
# Producer-side checks: the stages ignore a bad traceparent (as W3C Trace Context asks), but a
# producer sending one has a bug to hear about.
_MAX_TRACESTATE_BYTES = 512
_PREFIX = re.compile(r"[A-Za-z0-9_.\-]+")
_Entries = list[tuple[bytes, dict[bytes, bytes]]]


class SubmitFailed(RedisUnavailable):
    """A `submit`/`submit_many` that did not (or may not have) put its tasks in.

    Attributes:
        tasks: the tasks as sent, as wire fields with each one's `id` (given or assigned);
            `client.submit_many(exc.tasks)` sends exactly the same batch again.
        ids: their task ids, in order.
        maybe_added: False when Redis was not reached or refused the batch (none of the
            tasks was added); True when the connection failed with the batch in flight (all
            or none of them were added, and the client cannot tell which), or when Redis ran
            the transaction but failed some of its XADDs (some were added). Sending `tasks`
            again is safe either way: a task that is already in is dropped by the pipeline
            (same id, same request: no second call, no second result).
    """

    def __init__(self, message: str, tasks: list[dict[str, str]], maybe_added: bool) -> None:
        super().__init__(message)
        self.tasks = tasks
        self.ids = [fields["id"] for fields in tasks]
        self.maybe_added = maybe_added


# ---- validation (pure, no Redis) ------------------------------------------------------------


def task_fields(task: Mapping[str, object], settings: Settings | None = None) -> dict[str, str]:
    """Check one task and return its wire fields (all strings), in `WIRE_FIELDS` order.

    Accepts Python values (`max_tokens=100`, `messages=[…]`, `metadata={…}`) and their wire
    forms (`"100"`, JSON text), so a JSONL copy of an XADD validates the same way. As on the
    wire, an optional field given as None or "" counts as not given. Unknown fields are
    refused (a typo such as `max_token` would otherwise be dropped without a word).

    The rules are the cache-check stage's own: the fields are checked by `validate_request`
    with `settings` (default `Settings()`), so what this accepts is not dead-lettered later.
    Checking decides no route: that is cache-check's, once per task.

    Raises:
        InvalidTask: naming the field and what is wrong with it.
    """
    unknown = sorted(set(task) - set(WIRE_FIELDS))
    if unknown:
        raise InvalidTask(f"unknown field {unknown[0]!r} (known: {', '.join(WIRE_FIELDS)})")
    given = {k: v for k, v in task.items() if v is not None and (v != "" or k == "prompt")}
    if given.get("cache") is True:
        del given["cache"]  # DESIGN: only `false` means anything
    given.setdefault("model", "auto")
    given.setdefault("type", "default")
    fields = {name: _wire(name, given[name]) for name in WIRE_FIELDS if name in given}
    _check_producer_fields(fields)
    validate_request(fields, settings or Settings())
    return fields


def _wire(name: str, value: object) -> str:
    """One field's Python value as its wire string (validity is `parse_request`'s to judge)."""
    json_type = _JSON_FIELDS.get(name)
    if isinstance(value, str):
        text = value
    elif name == "cache" and isinstance(value, bool):
        text = "true" if value else "false"
    elif name in _NUMBER_FIELDS and isinstance(value, int | float):
        text = str(value)  # a bool becomes "True", which parse_request refuses by name
    elif json_type is not None and isinstance(value, json_type):
        plain = dict(value) if isinstance(value, Mapping) else value
        try:
            text = json.dumps(plain, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidTask(f"{name}: cannot be encoded as JSON ({exc})") from None
    else:
        raise InvalidTask(f"{name}: must be a string, not {type(value).__name__}")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise InvalidTask(f"{name}: is not valid UTF-8 text (a lone surrogate?)") from None
    return text


def with_id(fields: dict[str, str]) -> dict[str, str]:
    """`fields` with an `id`: the one given, else a new random one (`uuid4().hex`), in
    `WIRE_FIELDS` order. The client sends every task with an id so that a task whose fate
    is unknown (a connection lost after the send) can be sent again as the same task."""
    if fields.get("id"):
        return fields
    given = {**fields, "id": uuid.uuid4().hex}
    return {name: given[name] for name in WIRE_FIELDS if name in given}


def _check_producer_fields(fields: Mapping[str, str]) -> None:
    """The fields `parse_request` leaves alone: the task id and the trace context."""
    task_id = fields.get("id")
    if task_id is not None and (
        len(task_id) > MAX_TASK_ID_CHARS or not task_id.isprintable() or " " in task_id
    ):
        raise InvalidTask(f"id: must be 1-{MAX_TASK_ID_CHARS} printable characters, no spaces")
    traceparent = fields.get("traceparent")
    if traceparent is not None and not valid_traceparent(traceparent):
        raise InvalidTask("traceparent: is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)")
    size = len(fields.get("tracestate", "").encode())
    if size > _MAX_TRACESTATE_BYTES:
        raise InvalidTask(f"tracestate: {size} bytes, over the {_MAX_TRACESTATE_BYTES}-byte limit")


# ---- the client ------------------------------------------------------------------------------


class Client:
    """Submit tasks and fetch results; one per process is plenty (it is safe to share).

    Args:
        redis_url: `redis://`, `rediss://` or `unix://`; a password in the URL works.
        prefix: the pipeline's key prefix (`PIPELINE_PREFIX`).
        ingress: input bounds and the backlog cap (`Settings.ingress`).
        name: the Redis client name of every connection this client opens (`CLIENT LIST`).
        max_connections: commands wait for a free connection beyond this many.
        backlog_check_s: how long a measured ingress length is trusted; see `submit`.
        done_block_ms: the done-stream reader's XREAD BLOCK (its socket timeout is longer).
        settings: the rest of the settings tasks are validated with (`parse_request`: model
            aliases, limits); default `Settings()`. `redis_url`, `prefix` and `ingress` win.
    """

    def __init__(
        self,
        redis_url: str = "redis://localhost:6379/0",
        prefix: str = "pipeline",
        *,
        ingress: IngressSettings | None = None,
        name: str | None = None,
        max_connections: int = 64,
        connect_timeout_s: float = 5.0,
        socket_timeout_s: float = 10.0,
        backlog_check_s: float = 0.1,
        done_block_ms: int = 5000,
        settings: Settings | None = None,
    ) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise ConfigError("prefix", f"only letters, digits, '_', '-', '.' allowed: {prefix!r}")
        self.keys = Keys(prefix)
        base = settings or Settings()
        self.settings = msgspec.structs.replace(
            base,
            prefix=prefix,
            redis=msgspec.structs.replace(base.redis, url=redis_url),
            ingress=ingress or base.ingress,
        )
        self.limits: IngressSettings = self.settings.ingress
        self.name = name or f"pipeline-client-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._url = redis_url
        pool = BlockingConnectionPool.from_url(
            redis_url,
            max_connections=max_connections,
            timeout=None,  # wait for a free connection rather than fail a burst
            client_name=self.name,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
        )
        self.redis = Redis(connection_pool=pool)
        self._reader_redis = Redis.from_url(
            redis_url,
            single_connection_client=True,
            client_name=self.name,
            socket_timeout=done_block_ms / 1000 + socket_timeout_s,  # longer than the block
            socket_connect_timeout=connect_timeout_s,
        )
        self._done_block_ms = done_block_ms
        self._backlog_check_s = backlog_check_s
        self._backlog = 0
        self._backlog_at = -math.inf
        self._backlog_lock = asyncio.Lock()
        self._lookups = _HashLookups(self.redis)
        self._watcher: _DoneWatcher | None = None
        self._watcher_lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, *, name: str | None = None) -> Client:
        """A client for the Redis, prefix and ingress limits of `settings`."""
        return cls(
            settings.redis.url,
            settings.prefix,
            ingress=settings.ingress,
            name=name,
            max_connections=settings.redis.max_connections,
            connect_timeout_s=settings.redis.connect_timeout_s,
            socket_timeout_s=settings.redis.socket_timeout_s,
            settings=settings,
        )

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
        ttl: int | None = None,
        metadata: Mapping[str, object] | str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> str:
        """Add one task to the ingress and return its id: `id`, else a new `uuid4().hex`.

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
                "ttl": ttl,
                "metadata": metadata,
                "traceparent": traceparent,
                "tracestate": tracestate,
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
            return int(await self.redis.xlen(self.keys.ingress))

    async def _add(self, tasks: list[dict[str, str]]) -> list[str]:
        """Send `tasks` (each with its id) in one transaction; return their ids."""
        try:
            await self._reserve_room(len(tasks))
        except RedisUnavailable as exc:
            raise SubmitFailed(
                f"{exc}; none of the {len(tasks):,} task(s) was sent", tasks, maybe_added=False
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
                f"cannot reach Redis at {where}: {exc}; the connection failed with {n:,} "
                "task(s) in flight, so all or none of them were added: send exc.tasks again "
                "(same ids: a copy that is already in is dropped, not run twice)",
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
            raw = await self._lookups.hgetall(key)
        if not raw:
            return None
        return {k.decode(): v.decode(errors="replace") for k, v in raw.items()}

    async def _done_watcher(self) -> _DoneWatcher:
        async with self._watcher_lock:
            if self._watcher is None:
                watcher = _DoneWatcher(self._reader_redis, self.keys.done, self._done_block_ms)
                async with self._errors():
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


class _HashLookups:
    """HGETALLs from concurrent callers, group-committed into pipelined round trips.

    While one batch is on the wire the next collects, so 2,000 waiters woken together cost a
    few round trips on one connection instead of 2,000 connections.
    """

    _MAX_BATCH = 1000

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._queue: list[tuple[str, asyncio.Future[dict[bytes, bytes]]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        future: asyncio.Future[dict[bytes, bytes]] = asyncio.get_running_loop().create_future()
        self._queue.append((key, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._MAX_BATCH]
                del self._queue[: self._MAX_BATCH]
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for key, _ in batch:
                            pipe.hgetall(key)
                        rows = await pipe.execute()
                except (RedisError, OSError) as exc:
                    _settle(batch, exc)
                    continue
                except asyncio.CancelledError:  # nobody may be left waiting forever
                    _settle(batch + self._queue, RedisUnavailable("the client was closed"))
                    self._queue.clear()
                    raise
                for (_, future), row in zip(batch, rows, strict=True):
                    if not future.done():
                        future.set_result(row)
        finally:
            self._flusher = None


def _settle(
    batch: list[tuple[str, asyncio.Future[dict[bytes, bytes]]]], exc: BaseException
) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)


class _DoneWatcher:
    """The one `XREAD BLOCK` loop on the done stream; wakes the waiters of each task id.

    Started by the first `result(…, wait=…)` and kept until `Client.aclose()`, so its position
    in the stream only moves forward and no completion slips between two waits.
    """

    def __init__(self, redis: Redis, done_key: str, block_ms: int) -> None:
        self._redis = redis
        self._key = done_key
        self._block_ms = block_ms
        self._cursor: bytes = b"0-0"
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        return sum(len(futures) for futures in self._waiters.values())

    async def start(self) -> None:
        """Capture `$` as a concrete id first, so no event after this moment is missed."""
        last = cast("_Entries", await self._redis.xrevrange(self._key, count=1))
        self._cursor = last[0][0] if last else b"0-0"
        self._task = asyncio.create_task(self._run(), name="pipeline-client-done-reader")

    def register(self, task_id: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(task_id, set()).add(future)
        return future

    def unregister(self, task_id: str, future: asyncio.Future[None]) -> None:
        futures = self._waiters.get(task_id)
        if futures is not None:
            futures.discard(future)
            if not futures:
                del self._waiters[task_id]

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(RedisUnavailable("the client was closed"))
        self._waiters.clear()

    async def _run(self) -> None:
        delay_s, down = 0.05, False
        while True:
            try:
                reply = cast(
                    "list[tuple[bytes, _Entries]] | None",
                    await self._redis.xread(
                        {self._key: self._cursor}, count=1000, block=self._block_ms
                    ),
                )
            except (RedisError, OSError) as exc:
                if not down:
                    log.warning("done-stream reader: %r; retrying (waiters keep waiting)", exc)
                    down = True
                await asyncio.sleep(delay_s)
                delay_s = min(5.0, delay_s * 2)
                continue
            if down:
                log.warning("done-stream reader: reading again")
            delay_s, down = 0.05, False
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    self._cursor = entry_id
                    task_id = fields.get(b"id")
                    if task_id is not None:
                        self._wake(task_id.decode(errors="replace"))

    def _wake(self, task_id: str) -> None:
        for future in self._waiters.pop(task_id, ()):
            if not future.done():
                future.set_result(None)


__all__ = ["BATCH_SIZE", "WIRE_FIELDS", "Client", "task_fields"]
