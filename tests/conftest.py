"""Test harness: a real Redis server (never a mock), a unique key prefix per test.

Where the server comes from, in order: `REDIS_URL` if set; a private `redis-server` on a free
port (the binary on PATH); a testcontainers Redis where a Docker engine runs. Tests that kill
or restart Redis always get a private server of their own (`private_redis`).

A Redis Cluster (`redis_cluster`): `REDIS_CLUSTER_URL` (any node of a running cluster) if set,
else 3 primaries + 3 replicas of our own from the `redis-server`/`redis-cli` binaries on PATH,
shared by the session. Tests that kill cluster nodes get a cluster of their own
(`private_redis_cluster`).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis

from pipeline.claude.config import load_settings
from pipeline.claude.settings import Settings
from pipeline.fake_claude import FakeClaudeConfig, FakeClaudeServer, run_fake_claude_in_thread
from pipeline.runtime.keys import Keys
from tests.helpers.redis_cluster import (
    ExistingRedisCluster,
    LocalRedisCluster,
    RedisClusterBase,
    redis_cli_for,
)
from tests.helpers.redis_server import RedisServer, newest_redis_server
from tests.helpers.workers import Workers, stop_leftovers


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env().ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    if newest_redis_server():
        server = RedisServer(tmp_path_factory.mktemp("redis")).start()
        yield server.url
        server.stop()
        return
    if _docker_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7.0") as container:
            host, port = container.get_container_host_ip(), container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        return
    pytest.exit("no Redis: set REDIS_URL, install redis-server, or run a Docker engine", 2)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (appendonly on), which the test may kill or restart."""
    if not newest_redis_server():
        pytest.skip("needs the redis-server binary to restart a server of its own")
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    yield server
    server.stop()


def _cluster_binaries() -> bool:
    server = newest_redis_server()
    return server is not None and redis_cli_for(server) is not None


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterBase]:
    """A healthy Redis Cluster for the session: `.url` names one primary, `.nodes` lists
    every node with its port and role. Tests must leave it as they found it: one that kills
    nodes takes `private_redis_cluster` instead."""
    if url := os.environ.get("REDIS_CLUSTER_URL"):
        existing = ExistingRedisCluster(url)
        existing.wait_healthy(timeout=10)
        yield existing
        return
    if not _cluster_binaries():
        pytest.skip("needs redis-server and redis-cli (or REDIS_CLUSTER_URL) for a Cluster")
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def private_redis_cluster(tmp_path: Path) -> Iterator[LocalRedisCluster]:
    """A Cluster of this test's own (3 primaries + 3 replicas), whose nodes it may kill
    (`kill_primary`, `wait_failover`, `restart`); a short node timeout fails over in ~2 s."""
    if not _cluster_binaries():
        pytest.skip("needs redis-server and redis-cli to run a Cluster of its own")
    cluster = LocalRedisCluster(tmp_path / "redis-cluster", node_timeout_ms=1000).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other test uses; its keys are deleted afterwards (never FLUSHALL)."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=Keys(name).pattern(), count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


#: Short timings so crash tests run in seconds, not minutes.
FAST = {
    "PIPELINE_RUNTIME__LEASE_MS": "3000",
    "PIPELINE_RUNTIME__RECLAIM_EVERY_MS": "300",
    "PIPELINE_RUNTIME__BLOCK_MS": "500",
    "PIPELINE_RUNTIME__GRACE_S": "5",
    "PIPELINE_RETRY__BASE_MS": "200",
    "PIPELINE_RETRY__MAX_MS": "1000",
    "PIPELINE_RETRY__PROMOTE_EVERY_MS": "50",
}


@pytest.fixture
def fast_env(redis_url: str, prefix: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "PIPELINE_PREFIX": prefix, **FAST}


@pytest.fixture
def settings(fast_env: dict[str, str]) -> Settings:
    return load_settings(env=fast_env)


@pytest.fixture
def workers(fast_env: dict[str, str], tmp_path: Path) -> Iterator[Workers]:
    w = Workers(fast_env, tmp_path)
    yield w
    w.stop_all()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def aredis(redis_url: str, anyio_backend: str) -> AsyncIterator[Redis]:
    """An asyncio Redis client on the test server (closed after the test)."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(autouse=True)
def _no_leftover_workers() -> Iterator[None]:
    """A worker a test started and did not stop is killed when the test ends."""
    yield
    stop_leftovers()


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK falls back to these: a test sees only the credentials it passes, and the real
    API is never called from a test."""
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


StartFake = Callable[..., FakeClaudeServer]


@pytest.fixture
def start_fake() -> Iterator[StartFake]:
    """`start_fake(**FakeClaudeConfig fields)`: a fake Claude API on a thread, for one test."""
    with contextlib.ExitStack() as stack:

        def start(**fields: Any) -> FakeClaudeServer:
            return stack.enter_context(run_fake_claude_in_thread(FakeClaudeConfig(**fields)))

        yield start
