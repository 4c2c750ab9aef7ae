"""Connecting to Redis, and waiting out an outage instead of dying (the "Shutdown is clean"
guarantee).

One node or a Cluster: `open_redis` asks the node the URL names (`INFO cluster`) and returns a
`redis.asyncio.Redis` or a `redis.asyncio.RedisCluster` built from the same settings (TLS with
`rediss://`, an ACL user and password in the URL, the same timeouts); `is_cluster` tells which
one a caller holds. `connect` stays the one-node client, built without asking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeGuard, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.connection import parse_url
from redis.exceptions import BusyLoadingError, ReadOnlyError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline.runtime import cluster_node_fix
from pipeline.runtime.errors import ConfigError
from pipeline.runtime.redis_errors import TABLE, Action, Fault, RedisRefused, classify
from pipeline.runtime.redis_sentinel import is_sentinel_url, master_client
from pipeline.runtime.settings import RedisSettings

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: What `open_redis` returns: a client for one node, or for a Cluster.
AnyRedis: TypeAlias = Redis | RedisCluster

#: For a one-shot command (the CLI, a producer): errors that mean "Redis is not there right
#: now", as opposed to a bad command. Loops wait out more (`pipeline.runtime.redis_errors`).
UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    ReadOnlyError,
    ConnectionError,
    OSError,
)


def connect(settings: RedisSettings) -> Redis:
    """A client for `settings.url` (redis://, rediss://, unix://; user:password in the URL).

    The pool blocks when all `max_connections` are busy instead of failing: hundreds of
    handlers in one process share a few dozen connections.
    """
    return node_client(
        settings.url,
        max_connections=settings.max_connections,
        pool_timeout=settings.socket_timeout_s,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        health_check_interval=30,
    )


def node_client(
    url: str, *, max_connections: int, pool_timeout: float | None, **connection: Any
) -> Redis:
    """A client of one node (redis://, rediss://, unix://) or of a Sentinel-managed primary
    (`redis+sentinel://`, `pipeline.runtime.redis_sentinel`), whose callers wait up to
    `pool_timeout` (None: as long as it takes) for one of `max_connections` connections.
    `connection`: socket timeouts, a client name, a health check interval."""
    connection.setdefault("decode_responses", False)
    if is_sentinel_url(url):
        return master_client(
            url, max_connections=max_connections, pool_timeout=pool_timeout, **connection
        )
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout, **connection
    )
    return Redis.from_pool(pool)


#: A worker on a Cluster holds one blocking read per stage, lane and partition (144 for the
#: four stages' nine streams in 16 partitions) besides its handlers' commands.
CLUSTER_MIN_CONNECTIONS = 512


class _WaitingCluster(RedisCluster):
    """A Cluster client whose callers wait for a free connection, as with `connect`'s pool.

    redis-py's Cluster client holds up to `max_connections` connections *per node* and
    raises `MaxConnectionsError` past that (it has no blocking pool); as that is a
    `ConnectionError`, `Availability.call` would take it for an outage, and leases would
    lapse while it waited. So commands in flight are bounded by `max_connections` in all:
    no node can run out.
    """

    _gate: asyncio.Semaphore | None = None

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._gate is None:
            limit = self.get_connection_kwargs()["max_connections"]
            self._gate = asyncio.Semaphore(int(limit or CLUSTER_MIN_CONNECTIONS))
        async with self._gate, _closed_under_it():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # refused as redis-py refuses it
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        async with _closed_under_it():
            return await super().execute(*args, **kwargs)


@contextlib.asynccontextmanager
async def _closed_under_it() -> AsyncIterator[None]:
    """When a node fails, redis-py's Cluster client closes every connection while other
    tasks are using them; those fail with `AttributeError` (`None.writelines`) instead of a
    connection error (seen in failovers). Say what it is, so that callers wait it out."""
    try:
        yield
    except AttributeError as exc:
        raise RedisConnectionError(f"connection closed under a command: {exc}") from exc


def connect_cluster(settings: RedisSettings, **overrides: Any) -> RedisCluster:
    """A Cluster client for `settings.url`, which names any node of the cluster (the client
    learns the others from it). Same TLS, credentials and timeouts as `connect`; `overrides`
    are more `RedisCluster` options, or other values for these (a client name, a longer
    socket timeout for a blocking reader). A caller waits for a free connection
    (`_WaitingCluster`); a worker holds a blocking read per stage, lane and partition, so
    at least `CLUSTER_MIN_CONNECTIONS` are kept per node (docs/CLUSTER.md).
    """
    if settings.url.startswith("unix://") or is_sentinel_url(settings.url):
        raise ConfigError(
            "redis.url", "a Redis Cluster is reached over TCP at one of its nodes, not a unix "
            "socket or sentinels",
        )  # fmt: skip
    if parse_url(settings.url).get("db"):
        raise ConfigError(
            "redis.url", f"a Redis Cluster has only database 0: {redacted(settings.url)}"
        )
    cluster_node_fix.apply()
    options: dict[str, Any] = {
        "max_connections": max(settings.max_connections, CLUSTER_MIN_CONNECTIONS),
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.connect_timeout_s,
        "health_check_interval": 30,
        "decode_responses": False,
        **overrides,
    }
    return _WaitingCluster.from_url(settings.url, **options)


async def cluster_enabled(settings: RedisSettings) -> bool:
    """Whether the node `settings.url` names runs in cluster mode (`INFO cluster` says
    `cluster_enabled:1`), asked on a connection of its own that is closed at once.

    Redis being away, or refusing the credentials, raises as any command would (wrap it in
    `Availability.call` to wait). A unix socket is never a Cluster (nothing is asked).
    """
    if settings.url.startswith("unix://") or is_sentinel_url(settings.url):
        return False
    probe = Redis.from_url(
        settings.url,
        single_connection_client=True,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        decode_responses=False,
    )
    try:
        info = await probe.info("cluster")
    finally:
        await probe.aclose()
    return str(info.get("cluster_enabled", 0)) == "1"


async def open_redis(settings: RedisSettings) -> AnyRedis:
    """The client for `settings.url`: a `RedisCluster` when that node is part of a Cluster
    (found out once, here; the cluster's nodes and slots are read before returning), else
    `connect(settings)`. Redis being away raises (see `cluster_enabled`)."""
    if is_sentinel_url(settings.url):
        sentinel = connect(settings)
        try:  # the sentinels name a primary that answers, or this raises as an outage would
            await sentinel.ping()
        except BaseException:
            await sentinel.aclose()
            raise
        return sentinel
    if not await cluster_enabled(settings):
        return connect(settings)
    client = connect_cluster(settings)
    try:
        await client.initialize()
    except BaseException:
        await client.aclose()
        raise
    return client


def is_cluster(client: AnyRedis) -> TypeGuard[RedisCluster]:
    """Whether `client` talks to a Cluster (keys must then hash to one slot per command)."""
    return isinstance(client, RedisCluster)


async def server_version(redis: AnyRedis) -> tuple[int, ...]:
    """The Redis version; on a Cluster the oldest of the nodes the client knows (its
    primaries): a feature that needs a newer server waits until every primary has it."""
    if is_cluster(redis):
        per_node = await redis.info("server", target_nodes=RedisCluster.ALL_NODES)
        return min(_version(info) for info in per_node.values())
    return _version(await redis.info("server"))


def _version(info: dict[str, Any]) -> tuple[int, ...]:
    return tuple(int(p) for p in str(info["redis_version"]).split(".")[:3])


def redacted(url: str) -> str:
    """The URL with any password replaced, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{host}" if ":" in creds else f"{scheme}{sep}{user}@{host}"


#: An outage of the same kind within this long after the last one cleared is not logged
#: again (a server at maxmemory refuses and accepts writes by turns).
QUIET_S = 30.0
#: How long Redis must stay back before the log says so.
SETTLE_S = 1.0
#: Connection errors retried at once without a word, within this long of the first: after a
#: restart each pooled connection fails once as it is reused, and a fresh one then works.
_SILENT_RETRIES, _SILENT_S = 5, 1.0


class Availability:
    """Shared by every loop of a process: waits out what `pipeline.runtime.redis_errors` says
    to wait out, with one log line when Redis goes away, one when the reason changes, one when back.

    Only a call that failed can say Redis is back: during a READONLY or OOM outage reads
    still succeed, and must not make the state (and the log) flap. "Back" is said once the
    state has held for `SETTLE_S`: a failover passes through several states in a second.
    """

    def __init__(self, url: str, max_backoff_s: float = 5.0) -> None:
        self._url = redacted(url)
        self._down_since: float | None = None
        self._down_code = ""
        self._announced = self._changed = False
        self._cleared = ("", -QUIET_S)  # (code, monotonic time) of the last outage's end
        self._back: asyncio.TimerHandle | None = None  # the pending "back" line
        self._back_state = (0.0, "", False)  # what a cut-short "back" resumes
        self._max_backoff_s = max_backoff_s

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def _mark_down(self, fault: Fault, exc: BaseException) -> None:
        now = time.monotonic()
        if self._down_since is None and self._back is not None:  # back for a moment only
            self._back.cancel()
            self._back = None
            self._down_since, self._down_code, self._changed = self._back_state
            self._announced = True
        if self._down_since is None:
            self._down_since, self._down_code, self._changed = now, fault.code, False
            code, cleared_at = self._cleared
            self._announced = not (code == fault.code and now - cleared_at < QUIET_S)
            if self._announced:
                log.warning(
                    "redis unavailable at %s: %s (%s); waiting",
                    self._url,
                    fault.meaning,
                    _brief(exc),
                )
        elif fault.code != self._down_code:
            self._down_code = fault.code
            if not self._announced:
                log.warning("redis unavailable at %s: %s; waiting", self._url, fault.meaning)
            elif not self._changed:  # one line for a change of reason; a failover has several
                log.warning("redis still unavailable at %s: now %s", self._url, fault.meaning)
            self._announced = self._changed = True

    def _mark_up(self) -> None:
        if self._down_since is None:
            return
        now = time.monotonic()
        if self._announced:
            self._back_state = (self._down_since, self._down_code, self._changed)
            after = now - self._down_since
            self._back = asyncio.get_running_loop().call_later(SETTLE_S, self._say_back, after)
        self._cleared = (self._down_code, now)
        self._down_since, self._down_code = None, ""

    def _say_back(self, after: float) -> None:
        self._back = None
        log.warning("redis back at %s after %.1fs", self._url, after)

    async def call(
        self,
        op: Callable[[], Awaitable[_T]],
        recreate: Callable[[], Awaitable[None]] | None = None,
    ) -> _T:
        """Run `op` until it succeeds, waiting out what Redis will get over by itself.

        `recreate`: what to do when a stream or consumer group is gone (NOGROUP) before
        trying again; without it, NOGROUP is raised. Refused credentials raise
        `RedisRefused`; errors the table does not know are raised as they are.

        A few connection failures in a row are retried at once without a word: after a
        restart, each pooled connection fails once as it is reused.
        """
        delay, failures, recreated, first_failure = 0.05, 0, 0, 0.0
        while True:
            try:
                result = await op()
            except (RedisError, OSError, RuntimeError) as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # redis-py may turn a cancellation that lands mid-command into a
                    # connection error; retrying it would swallow the cancel (a hang).
                    raise asyncio.CancelledError from exc
                if isinstance(exc, RuntimeError) and not _closed_transport(exc):
                    raise
                fault = _CLOSED if isinstance(exc, RuntimeError) else classify(exc)
                if fault is None:
                    raise
                if fault.action is Action.STOP:
                    raise RedisRefused(f"redis at {self._url}: {fault.meaning} ({exc})") from None
                if fault.action is Action.RECREATE:
                    recreated += 1
                    if recreate is None or recreated > 3:  # it did not help: not ours to fix
                        raise
                    await recreate()
                    continue
                failures += 1
                if failures == 1:
                    first_failure = time.monotonic()
                if (
                    fault.code == "connection"
                    and not self.down
                    and failures <= _SILENT_RETRIES
                    and time.monotonic() - first_failure < _SILENT_S
                ):
                    continue
                self._mark_down(fault, exc)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(self._max_backoff_s, delay * 2)
                continue
            if failures:
                self._mark_up()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A cancellation that landed mid-command, which redis-py swallowed and
                # finished the command instead: deliver it, or the task never stops.
                raise asyncio.CancelledError
            return result


def _brief(exc: BaseException) -> str:
    """The error's first line, short (a script error can quote a whole script)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _closed_transport(exc: RuntimeError) -> bool:
    """uvloop reports a write on a connection the server just closed as a RuntimeError."""
    return "Transport closed" in str(exc)


_CLOSED = next(fault for fault in TABLE if fault.code == "connection")
