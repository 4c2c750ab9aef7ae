"""`redis.durability = "replicated"`: what was written counts only once a replica has it.

Redis replicates asynchronously: a primary that dies a moment after acknowledging a write may
take it with it when its replica is promoted. Within one slot that loses a hand-off whole
(its ack with it, so the entry is simply delivered again), but a step whose two writes lie in
two slots (the ingress mover, the result publisher) or whose write stands for money spent (a
paid call's record) must not go on until a replica holds the first write.

`WAIT` counts the writes of the connection it is sent on, and cannot run in a script; so after
a write, `write(...)` sends, on one connection to the primary serving each key's slot, a tiny
write in that slot and `WAIT`: the primary's replication stream is ordered, so once a replica has
that write it has everything the primary did before it. One round trip per batch of writes
(the runner syncs once per hand-off batch: group commit).

A confirmation counts only from the node that took the write. If a failover moved the slot
(or the primary a Sentinel names) between the write and the `WAIT` (the client followed it
to the promoted replica, which may never have had the write), a `WAIT` there proves nothing
about it: `write` writes again (every write made under it is idempotent) and confirms again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from pipeline.runtime.redis_conn import Availability
from pipeline.runtime.settings import RedisSettings

__all__ = ["Replication", "sync_key"]

log = logging.getLogger(__name__)
_WARN_EVERY_S = 60.0
_T = TypeVar("_T")


def sync_key(prefix: str, key: str) -> str:
    """A key of `prefix` in `key`'s slot, for the marker write (`<prefix>:{p3}:sync` for a
    partition's key; `<prefix>:{<key>}:sync` for an untagged one)."""
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    tag = key[start + 1 : end] if end > start + 1 else key
    return f"{prefix}:{{{tag}}}:sync"


def _at_node(url: str, host: str, port: int) -> str:
    """`url` (its scheme, credentials and options: TLS, ACL user) at another node."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


class Replication:
    """Waits, after writes, until `replicas` replicas have them (a no-op when `durability`
    is "acknowledged")."""

    def __init__(
        self, redis: Redis, prefix: str, settings: RedisSettings, available: Availability
    ) -> None:
        self.enabled = settings.durability == "replicated"
        self._redis, self._prefix, self._available = redis, prefix, available
        self._url = settings.url
        #: On a Cluster: one connection of our own per primary, for the marker and WAIT.
        self._direct: dict[str, Redis] = {}
        self._replicas, self._timeout_ms = settings.replicas, settings.replica_timeout_ms
        self._warned = -_WARN_EVERY_S
        self.short = 0  # syncs no replica confirmed in time (for tests and status)
        self.rewrites = 0  # writes made again: a failover came between write and confirmation

    async def write(self, write: Callable[[], Awaitable[_T]], *keys: str) -> _T:
        """Run `write` (its writes go to the primaries serving `keys`; it must be safe to run
        again) and return its reply once `replicas` replicas hold what it wrote (at most
        `replica_timeout_ms` per primary; then warn and go on: a write cannot be taken back,
        and refusing all work while a replica is away would turn a replica's outage into the
        pipeline's). If a key's slot changed primary before a replica confirmed, the write
        may have been lost with the old one: run it again."""
        if not self.enabled or not keys:
            return await write()
        while True:
            before = self._serving(keys)
            reply = await write()
            confirmed = await self._sync(before)
            # '': one node, or a Sentinel-managed one before its first connection (the
            # write itself found the primary): nothing to compare.
            if confirmed == set(before.values()) or set(before.values()) == {""}:
                return reply
            self.rewrites += 1
            log.warning(
                "durability: the primary serving %r changed before a replica confirmed a "
                "write (a failover); writing it again", keys[0],
            )  # fmt: skip
            await asyncio.sleep(0.05)  # the client's slot map settles

    def _serving(self, keys: tuple[str, ...]) -> dict[str, str]:
        """One key per primary serving `keys`, by the name of the node the client sends
        them to ('' on one node)."""
        redis: Any = self._redis
        if not isinstance(redis, RedisCluster):
            return {keys[0]: self._primary()}
        by_key: dict[str, str] = {}
        seen: set[str] = set()
        for key in keys:
            try:
                node = redis.get_node_from_key(key)
            except RedisClusterException:  # the slot map is being refreshed
                node = None
            name = node.name if node else "?"
            if name not in seen:
                seen.add(name)
                by_key[key] = name
        return by_key

    async def _sync(self, keys: dict[str, str]) -> set[str]:
        """Confirm every write so far on the primaries now serving `keys`; the names of the
        nodes that confirmed."""
        redis: Any = self._redis
        if not isinstance(redis, RedisCluster):
            await self._available.call(lambda: self._sync_one(next(iter(keys))))
            return {self._primary()}
        confirmed: set[str] = set()
        for key in keys:
            confirmed.add(await self._available.call(lambda k=key: self._sync_cluster(redis, k)))  # type: ignore[misc]
        return confirmed

    def _primary(self) -> str:
        """One node: the primary a Sentinel-managed pool last found (it asks the sentinels
        on each new connection, so a failover shows here once the client followed it);
        '' for a plain node, which cannot change."""
        address = getattr(self._redis.connection_pool, "master_address", None)
        return f"{address[0]}:{address[1]}" if address else ""

    async def _sync_one(self, key: str) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(sync_key(self._prefix, key), 1, px=1000)
            pipe.execute_command("WAIT", self._replicas, self._timeout_ms)
            replies = await pipe.execute()
        self._check(replies[1])

    async def _sync_cluster(self, redis: RedisCluster, key: str) -> str:
        """Confirm on the primary now serving `key`'s slot; its name."""
        marker = sync_key(self._prefix, key)
        # First through the client's own path, which follows a failover (a dead node, MOVED
        # once its replica took over) and learns the slots; then the marker and WAIT on a
        # connection of our own to the node that took that write.
        await redis.set(marker, 1, px=1000)
        node = redis.get_node_from_key(marker)
        if node is None:  # the slot map is being refreshed: try again
            raise RedisConnectionError(f"no node serves {key!r} yet")
        direct = self._direct.get(node.name)
        if direct is None:
            url = _at_node(self._url, node.host, int(node.port))
            direct = self._direct[node.name] = Redis.from_url(url, single_connection_client=True)
        try:
            async with direct.pipeline(transaction=False) as pipe:
                pipe.set(marker, 1, px=1000)
                pipe.execute_command("WAIT", self._replicas, self._timeout_ms)
                replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            # That node failed, or no longer serves the slot: forget the connection; the
            # next try asks the client again.
            self._direct.pop(node.name, None)
            await direct.aclose()
            raise RedisConnectionError(f"syncing {key!r}: {exc}") from exc
        self._check(replies[1])
        return str(node.name)

    async def aclose(self) -> None:
        for direct in self._direct.values():
            await direct.aclose()
        self._direct.clear()

    def _check(self, acked: object) -> None:
        if isinstance(acked, int) and acked >= self._replicas:
            return
        self.short += 1
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY_S:
            self._warned = now
            log.warning(
                "durability: %s of %d replicas confirmed a write within %d ms; going on "
                "(a primary lost now may lose it; repeats silenced for %.0fs)",
                acked, self._replicas, self._timeout_ms, _WARN_EVERY_S,
            )  # fmt: skip
