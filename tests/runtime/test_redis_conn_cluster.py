"""One node or a Cluster, found out from the URL (`pipeline.runtime.redis_conn.open_redis`).

- A single node gives the blocking-pool `Redis` that `connect` builds; any node of a Cluster
  (a primary or a replica) gives a `RedisCluster` that knows every node and serves keys of
  every slot. `is_cluster` tells them apart; `server_version` works on both.
- Same settings either way: socket and connect timeouts, `max_connections` (per node on a
  Cluster), bytes replies; an ACL user and password in the URL; TLS with `rediss://` (a CA in
  the URL's `ssl_ca_certs`), on one node and on a TLS-only Cluster.
- Refusals: wrong credentials and an absent server raise from `open_redis` (a caller wraps it
  in `Availability.call`); a Cluster URL naming a database other than 0 is a `ConfigError`;
  a unix socket is taken as one node without asking.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import BlockingConnectionPool, SSLConnection
from redis.exceptions import AuthenticationError, RedisError

from pipeline.runtime import cluster_node_fix
from pipeline.runtime.errors import ConfigError
from pipeline.runtime.redis_conn import (
    CLUSTER_MIN_CONNECTIONS,
    UNAVAILABLE,
    cluster_enabled,
    connect,
    connect_cluster,
    is_cluster,
    open_redis,
    server_version,
)
from pipeline.runtime.settings import RedisSettings
from tests.helpers.redis_cluster import LocalRedisCluster, RedisClusterBase, make_tls_files
from tests.helpers.redis_server import RedisServer, TunedRedisServer, free_port

pytestmark = pytest.mark.anyio

SETTINGS = {"max_connections": 7, "connect_timeout_s": 3.0, "socket_timeout_s": 9.0}


def _settings(url: str) -> RedisSettings:
    return RedisSettings(url=url, **SETTINGS)  # type: ignore[arg-type]


async def _round_trip(client: Redis | RedisCluster, prefix: str, n: int = 30) -> None:
    """Keys of many slots written and read back (bytes, not str)."""
    for i in range(n):
        await client.set(f"{prefix}:{i}", f"v{i}")
    for i in range(n):
        assert await client.get(f"{prefix}:{i}") == f"v{i}".encode()
    for i in range(n):
        await client.delete(f"{prefix}:{i}")


# ---- one node ---------------------------------------------------------------------------------


async def test_a_single_node_opens_the_blocking_pool_client(redis_url: str) -> None:
    settings = _settings(redis_url)
    assert await cluster_enabled(settings) is False
    client = await open_redis(settings)
    try:
        assert type(client) is Redis and not is_cluster(client)
        pool = client.connection_pool
        assert isinstance(pool, BlockingConnectionPool)
        assert pool.max_connections == 7
        assert pool.connection_kwargs["socket_timeout"] == 9.0
        assert pool.connection_kwargs["socket_connect_timeout"] == 3.0
        assert pool.connection_kwargs["decode_responses"] is False
        await _round_trip(client, f"t{uuid.uuid4().hex[:10]}")
        assert (await server_version(client))[0] >= 7
    finally:
        await client.aclose()


@pytest.fixture
def acl_user(private_redis: RedisServer) -> Iterator[tuple[str, str]]:
    name, password = f"u{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    with redis.Redis.from_url(private_redis.url) as admin:
        admin.acl_setuser(name, enabled=True, passwords=[f"+{password}"], keys=["*"],
                          commands=["+@all"])  # fmt: skip
    yield name, password


async def test_a_single_node_with_an_acl_user(
    private_redis: RedisServer, acl_user: tuple[str, str]
) -> None:
    name, password = acl_user
    url = f"redis://{name}:{password}@127.0.0.1:{private_redis.port}/0"
    client = await open_redis(_settings(url))
    try:
        assert not is_cluster(client)
        assert await client.acl_whoami() == name
    finally:
        await client.aclose()
    with pytest.raises(AuthenticationError):
        await open_redis(_settings(f"redis://{name}:wrong@127.0.0.1:{private_redis.port}/0"))


async def test_a_single_node_over_tls(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    if tls is None:
        pytest.skip("needs openssl to make a certificate")
    port = free_port()
    server = TunedRedisServer(
        tmp_path / "redis",
        extra={
            "port": "0", "tls-port": str(port), "tls-cert-file": str(tls.cert),
            "tls-key-file": str(tls.key), "tls-ca-cert-file": str(tls.ca_cert),
            "tls-auth-clients": "no",
        },
    ).start(wait=False)  # fmt: skip
    try:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tls.ca_cert}"
        _wait_tls(port, str(tls.ca_cert))
        client = await open_redis(_settings(url))
        try:
            assert isinstance(client, Redis)
            assert client.connection_pool.connection_class is SSLConnection
            await _round_trip(client, "tls")
        finally:
            await client.aclose()
        # The CA matters: without it the certificate is refused, not ignored.
        with pytest.raises(RedisError, match="CERTIFICATE_VERIFY_FAILED"):
            await open_redis(_settings(f"rediss://127.0.0.1:{port}/0"))
    finally:
        server.stop()


def _wait_tls(port: int, ca: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with redis.Redis(port=port, ssl=True, ssl_ca_certs=ca, socket_timeout=2) as c:
                c.ping()
                return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def test_redis_away_raises_what_callers_wait_out() -> None:
    with pytest.raises(UNAVAILABLE):
        await open_redis(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0"))


async def test_a_unix_socket_is_one_node_without_asking(tmp_path: Path) -> None:
    settings = RedisSettings(url=f"unix://{tmp_path / 'nobody.sock'}")
    assert await cluster_enabled(settings) is False  # nothing listens: it did not ask
    client = await open_redis(settings)
    assert not is_cluster(client)
    await client.aclose()


# ---- a Cluster --------------------------------------------------------------------------------


async def test_any_node_of_a_cluster_opens_a_cluster_client(
    redis_cluster: RedisClusterBase,
) -> None:
    primary = redis_cluster.primaries[0]
    replica = redis_cluster.replica_of(primary.port)
    for port in (primary.port, replica.port):
        settings = _settings(redis_cluster.url_of(port))
        assert await cluster_enabled(settings) is True
        client = await open_redis(settings)
        try:
            assert isinstance(client, RedisCluster) and is_cluster(client)
            primaries = {node.port for node in client.get_primaries()}
            assert primaries == {n.port for n in redis_cluster.primaries}
            for node in client.get_nodes():
                assert node.max_connections == max(7, CLUSTER_MIN_CONNECTIONS)  # a floor
                assert node.connection_kwargs["socket_timeout"] == 9.0
                assert node.connection_kwargs["socket_connect_timeout"] == 3.0
                assert node.connection_kwargs["decode_responses"] is False
            await _round_trip(client, f"t{uuid.uuid4().hex[:10]}")
            assert (await server_version(client))[0] >= 7
        finally:
            await client.aclose()


async def test_connect_stays_the_one_node_client_even_on_a_cluster_node(
    redis_cluster: RedisClusterBase,
) -> None:
    """`connect` does not ask: on a Cluster node it is a plain client (keys of other slots
    get MOVED), which is why callers move to `open_redis`."""
    client = connect(_settings(redis_cluster.url))
    try:
        assert not is_cluster(client)
        assert await client.ping()
    finally:
        await client.aclose()


async def test_a_cluster_url_naming_another_database_is_refused(
    redis_cluster: RedisClusterBase,
) -> None:
    with pytest.raises(ConfigError, match="only database 0"):
        connect_cluster(_settings(redis_cluster.url + "/2"))
    with pytest.raises(ConfigError, match="unix socket"):
        connect_cluster(RedisSettings(url="unix:///tmp/redis.sock"))


@pytest.fixture
def cluster_acl_user(redis_cluster: RedisClusterBase) -> Iterator[tuple[str, str]]:
    """A user on every node (ACLs are per node: a Cluster does not share them)."""
    name, password = f"u{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    ports = [n.port for n in redis_cluster.nodes]
    for port in ports:
        with redis_cluster.node_client(port) as admin:
            admin.acl_setuser(name, enabled=True, passwords=[f"+{password}"], keys=["*"],
                              commands=["+@all"])  # fmt: skip
    yield name, password
    for port in ports:
        with redis_cluster.node_client(port) as admin:
            admin.acl_deluser(name)


async def test_a_cluster_with_an_acl_user(
    redis_cluster: RedisClusterBase, cluster_acl_user: tuple[str, str]
) -> None:
    name, password = cluster_acl_user
    port = redis_cluster.primaries[0].port
    client = await open_redis(_settings(f"redis://{name}:{password}@127.0.0.1:{port}"))
    try:
        assert is_cluster(client)
        await _round_trip(client, f"t{uuid.uuid4().hex[:10]}")
        for node in client.get_primaries():
            assert await client.acl_whoami(target_nodes=node) == name
    finally:
        await client.aclose()
    with pytest.raises(AuthenticationError):
        await open_redis(_settings(f"redis://{name}:wrong@127.0.0.1:{port}"))


async def test_a_tls_only_cluster(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    if tls is None:
        pytest.skip("needs openssl to make a certificate")
    cluster = LocalRedisCluster(tmp_path / "cluster", tls=tls).start()
    try:
        assert cluster.url.startswith("rediss://")
        client = await open_redis(_settings(cluster.url))
        try:
            assert is_cluster(client)
            assert len(client.get_primaries()) == 3
            assert all(n.connection_class is SSLConnection for n in client.get_nodes())
            await _round_trip(client, "tls")
        finally:
            await client.aclose()
        with pytest.raises(RedisError, match="CERTIFICATE_VERIFY_FAILED"):
            await open_redis(_settings(cluster.url.partition("?")[0]))
    finally:
        cluster.stop()


async def _commands_while_idle_connections_close(
    cluster: RedisClusterBase, disconnect_free: Any
) -> list[BaseException]:
    """Run `disconnect_free` on a node while commands take its idle connections; the
    errors they met."""
    client = RedisCluster.from_url(cluster.url, max_connections=64)
    try:
        await client.initialize()
        key = f"race:{uuid.uuid4().hex}"
        node = client.get_node_from_key(key)
        assert node is not None
        await asyncio.gather(*(client.get(key) for _ in range(32)))  # idle connections
        assert len(node._free) >= 8
        errors: list[BaseException] = []

        async def get() -> None:
            try:
                await node.execute_command("GET", key)
            except Exception as exc:
                errors.append(exc)

        closing = asyncio.create_task(disconnect_free(node))
        await asyncio.sleep(0)  # the closing has begun and awaits the sockets
        await asyncio.gather(*(get() for _ in range(16)), closing)
        return errors
    finally:
        await client.aclose()


async def test_idle_connections_closed_after_an_error_are_out_of_reach_meanwhile(
    redis_cluster: RedisClusterBase,
) -> None:
    """redis-py closes a node's idle connections while they stay in its free list, so a
    command may take one and fail (a connection error, which closes the idle ones again:
    a storm after a failover). `cluster_node_fix` takes them out while they close."""
    original = ClusterNode.disconnect_free_connections
    if getattr(ClusterNode, "_pipeline_closes_out_of_reach", False):  # applied earlier
        original = _upstream_disconnect_free_connections
    racy = await _commands_while_idle_connections_close(redis_cluster, original)
    assert racy, "the unfixed method let commands through unharmed: is the fix still needed?"
    cluster_node_fix.apply()
    fixed = await _commands_while_idle_connections_close(
        redis_cluster, ClusterNode.disconnect_free_connections
    )
    assert fixed == []


async def _upstream_disconnect_free_connections(self: Any) -> None:
    """redis-py 8.1's method, as it was before `cluster_node_fix`."""
    if self._free:
        await asyncio.gather(
            *(connection.disconnect() for connection in tuple(self._free)),
            return_exceptions=True,
        )
