"""Eviction and persistence checks (the "Shutdown is clean" guarantee), against private
redis-server processes.

Each test starts its own server configured the way it needs (AOF on or off, save points,
an evicting policy, CONFIG renamed away, ACL users without +config), then reads it the way
a worker and `pipeline status` do.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis

from pipeline.runtime.keys import Keys
from pipeline.runtime.redis_durability import RedisDurability, inspect_durability
from tests.conftest import FAST
from tests.helpers.redis_server import RedisServer, newest_redis_server
from tests.helpers.workers import Workers, wait_until

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-Pa55"

StartServer = Callable[..., RedisServer]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """`start_server(*redis_server_args, appendonly=False)`: a private server for this test."""
    if not newest_redis_server():
        pytest.skip("needs the redis-server binary")
    servers: list[RedisServer] = []

    def start(*args: str, appendonly: bool = False) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", appendonly, extra_args=args)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


def inspect(url: str) -> RedisDurability:
    async def run() -> RedisDurability:
        client = Redis.from_url(url)
        try:
            return await inspect_durability(client)
        finally:
            await client.aclose()

    return asyncio.run(run())


def with_user(server: RedisServer, user: str, *rules: str) -> str:
    """An ACL user on `server` with `rules` (on top of everything else); its URL."""
    client = redis.Redis.from_url(server.url)
    client.execute_command("ACL", "SETUSER", user, "on", f">{PASSWORD}", "~*", "&*", "+@all",
                           *rules)  # fmt: skip
    client.close()
    return server.url.replace("redis://", f"redis://{user}:{PASSWORD}@")


# ---- what the check finds --------------------------------------------------------------------


def test_noeviction_with_aof_has_no_findings(start_server: StartServer) -> None:
    found = inspect(start_server(appendonly=True).url)
    assert found.findings == []
    assert found.maxmemory_policy == "noeviction" and found.maxmemory == 0
    assert found.aof_enabled is True and found.appendfsync == "always" and found.save == ""
    assert found.config_refused is None
    assert found.persistence == "AOF (appendfsync always)"
    assert found.eviction.startswith("maxmemory-policy noeviction (used ")
    assert found.eviction.endswith(", no maxmemory)")


def test_rdb_save_points_alone_are_persistence(start_server: StartServer) -> None:
    found = inspect(start_server("--save", "3600 1 300 100").url)
    assert found.findings == []
    assert found.aof_enabled is False and found.save == "3600 1 300 100"
    assert found.persistence == "RDB snapshots only (AOF off)"


@pytest.mark.parametrize(
    ("policy", "evicts"),
    [("allkeys-lru", "stream entries and results"), ("volatile-ttl", "keys with a TTL")],
)
def test_an_evicting_policy_is_a_finding_naming_it(
    start_server: StartServer, policy: str, evicts: str
) -> None:
    server = start_server("--maxmemory-policy", policy, "--maxmemory", "64mb", appendonly=True)
    found = inspect(server.url)
    [finding] = found.findings
    assert finding.code == "eviction"
    assert finding.message.startswith(f"maxmemory-policy is {policy}: Redis may evict ")
    assert evicts in finding.message
    assert "once a maxmemory limit is set" not in finding.message  # there is one
    assert finding.hint == "set it to noeviction (CONFIG SET maxmemory-policy noeviction, and " \
                           "in redis.conf)"  # fmt: skip
    assert found.eviction.endswith("of maxmemory 64.0 MiB)")


def test_an_evicting_policy_without_maxmemory_says_when_it_bites(
    start_server: StartServer,
) -> None:
    [finding] = inspect(start_server("--maxmemory-policy", "allkeys-lfu", appendonly=True).url
                        ).findings  # fmt: skip
    assert finding.code == "eviction"
    assert finding.message.endswith("once a maxmemory limit is set (none is now)")


def test_no_aof_and_no_save_points_is_a_finding(start_server: StartServer) -> None:
    found = inspect(start_server().url)  # the helper's default: --save "" --appendonly no
    [finding] = found.findings
    assert finding.code == "no-persistence"
    assert finding.line == (
        "no persistence (AOF off, no RDB save points): a Redis restart loses every queued "
        "task, pending retry and result; turn AOF on (CONFIG SET appendonly yes, and "
        "appendonly yes in redis.conf)"
    )
    assert found.persistence == "none (AOF off, no RDB save points)"


def test_config_renamed_away_falls_back_to_info(start_server: StartServer) -> None:
    """Managed Redis (ElastiCache) renames CONFIG: the policy and AOF come from INFO."""
    server = start_server("--rename-command", "CONFIG", "", "--maxmemory-policy", "allkeys-lru",
                          appendonly=True)  # fmt: skip
    with pytest.raises(redis.ResponseError):
        redis.Redis.from_url(server.url).config_get("maxmemory-policy")  # really refused
    found = inspect(server.url)
    assert found.config_refused is not None and "unknown command" in found.config_refused
    assert found.maxmemory_policy == "allkeys-lru"  # INFO memory
    assert found.maxmemory == 0
    assert found.aof_enabled is True  # INFO persistence
    assert found.save is None and found.appendfsync is None  # CONFIG GET only: unknown
    assert found.persistence == "AOF"
    [finding] = found.findings  # AOF on: persistence holds whatever the save points are
    assert finding.code == "eviction" and "allkeys-lru" in finding.message
    assert "CONFIG SET" not in finding.hint  # it would be refused
    assert "parameter group" in finding.hint


def test_config_refused_and_no_aof_says_unknown(start_server: StartServer) -> None:
    found = inspect(start_server("--rename-command", "CONFIG", "").url)
    assert found.save is None and found.aof_enabled is False
    assert found.persistence == "AOF off, RDB save points unknown"
    [finding] = found.findings  # not "no persistence": the save points are not known
    assert finding.code == "persistence-unknown"
    assert finding.message.startswith(
        "persistence unknown: AOF is off and the RDB save points cannot be read (CONFIG GET "
        "refused: unknown command 'CONFIG')"
    )


def test_acl_user_without_config_falls_back_to_info(start_server: StartServer) -> None:
    server = start_server("--maxmemory-policy", "volatile-lru")
    found = inspect(with_user(server, "nocfg", "-config"))
    assert found.config_refused is not None and "no permissions" in found.config_refused
    assert found.maxmemory_policy == "volatile-lru"
    assert [f.code for f in found.findings] == ["eviction", "persistence-unknown"]
    assert "volatile-lru" in found.findings[0].message


def test_acl_user_without_config_or_info_gets_unknowns_not_an_error(
    start_server: StartServer,
) -> None:
    server = start_server()
    found = inspect(with_user(server, "blind", "-config", "-info"))
    assert found.maxmemory_policy is None and found.aof_enabled is None and found.save is None
    assert found.eviction == "maxmemory-policy unknown"
    assert found.persistence == "unknown"
    assert [f.code for f in found.findings] == ["policy-unknown", "persistence-unknown"]
    assert "maxmemory-policy could not be read (CONFIG GET and INFO memory refused" in (
        found.findings[0].message
    )


def test_a_failed_snapshot_is_a_finding(start_server: StartServer, tmp_path: Path) -> None:
    """A snapshot that cannot be renamed into place (a directory is in the way) fails."""
    server = start_server("--save", "3600 1")
    (server.workdir / "dump.rdb").mkdir()
    client = redis.Redis.from_url(server.url)
    client.set("x", "1")
    client.bgsave()
    wait_until(lambda: client.info("persistence")["rdb_bgsave_in_progress"] == 0, 10,
               what="the snapshot to end")  # fmt: skip
    client.close()
    found = inspect(server.url)
    assert [f.code for f in found.findings] == ["snapshot-failing"]
    assert "rdb_last_bgsave_status:err" in found.findings[0].message


# ---- the worker says so at start --------------------------------------------------------------


def test_worker_logs_each_finding_once_and_keeps_running(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server("--maxmemory-policy", "allkeys-lru")
    url = with_user(server, "pipe")  # a password in the URL, which no log line may show
    prefix = "durable"
    workers = Workers({"REDIS_URL": url, "PIPELINE_PREFIX": prefix, **FAST}, tmp_path)
    try:
        worker = workers.start()
        wait_until(lambda: "no persistence" in worker.log(), 30, what="the worker's warnings")
        client = redis.Redis.from_url(server.url)
        client.xadd(Keys(prefix).ingress, {"n": "1"})
        wait_until(lambda: client.xlen(Keys(prefix).done) == 1, 30, what="a task to complete")
        client.close()
        assert worker.proc.poll() is None, worker.log()
        log = worker.log()
    finally:
        workers.stop_all()
    assert PASSWORD not in log
    warnings = [ln for ln in log.splitlines() if "WARNING pipeline.runtime.redis_durability" in ln]
    where = f"redis at redis://pipe:***@127.0.0.1:{server.port}/0: "
    assert [ln.partition(where)[2] for ln in warnings] == [
        "maxmemory-policy is allkeys-lru: Redis may evict stream entries and results under "
        "memory pressure, once a maxmemory limit is set (none is now); set it to noeviction "
        "(CONFIG SET maxmemory-policy noeviction, and in redis.conf)",
        "no persistence (AOF off, no RDB save points): a Redis restart loses every queued "
        "task, pending retry and result; turn AOF on (CONFIG SET appendonly yes, and "
        "appendonly yes in redis.conf)",
    ]
    [summary] = [ln for ln in log.splitlines() if "INFO pipeline.runtime.redis_durability" in ln]
    assert "maxmemory-policy allkeys-lru" in summary
    assert "persistence none (AOF off, no RDB save points)" in summary


def test_worker_on_a_safe_server_warns_nothing(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(appendonly=True)
    workers = Workers({"REDIS_URL": server.url, "PIPELINE_PREFIX": "safe", **FAST}, tmp_path)
    try:
        worker = workers.start()
        wait_until(lambda: "persistence AOF" in worker.log(), 30, what="the worker's summary")
    finally:
        workers.stop_all()
    assert "WARNING pipeline.runtime.redis_durability" not in worker.log()


# ---- pipeline status shows it -----------------------------------------------------------------


def status(url: str, *args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(REDIS_URL=url, PIPELINE_PREFIX="st", COLUMNS=str(columns))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", "--app",
                           "tests.apps:app", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc


def test_status_shows_policy_persistence_and_findings_in_80_columns(
    start_server: StartServer,
) -> None:
    server = start_server("--maxmemory-policy", "allkeys-lru", "--maxmemory", "1gb")
    out = status(server.url).stdout
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, out
    at = next(i for i, line in enumerate(lines) if line.startswith("redis: "))
    assert lines[at].startswith("redis: maxmemory-policy allkeys-lru (used ")
    assert lines[at].rstrip().endswith(" of maxmemory 1.0 GiB)")
    assert lines[at + 1].strip() == "persistence none (AOF off, no RDB save points)"
    text = " ".join(" ".join(lines[at + 2 :]).split())  # the findings, unwrapped
    assert text.startswith("! maxmemory-policy is allkeys-lru: Redis may evict stream entries")
    assert "! no persistence (AOF off, no RDB save points)" in text


def test_status_json_carries_the_findings_as_json_types(start_server: StartServer) -> None:
    server = start_server("--rename-command", "CONFIG", "", "--maxmemory-policy", "allkeys-lru")
    data = json.loads(status(server.url, "--json").stdout)["redis"]
    assert data["maxmemory_policy"] == "allkeys-lru"
    assert data["maxmemory"] == 0 and isinstance(data["used_memory"], int)
    assert data["aof_enabled"] is False
    assert data["save"] is None and data["appendfsync"] is None
    assert "unknown command" in data["config_refused"]
    assert [f["code"] for f in data["findings"]] == ["eviction", "persistence-unknown"]
    assert all(set(f) == {"code", "message", "hint"} for f in data["findings"])


def test_status_on_a_safe_server_shows_no_findings(start_server: StartServer) -> None:
    out = status(start_server(appendonly=True).url).stdout
    assert "persistence AOF (appendfsync always)" in out
    assert "!" not in out.partition("redis: ")[2]


def test_status_watch_shows_the_redis_line_in_every_frame(start_server: StartServer) -> None:
    server = start_server("--maxmemory-policy", "allkeys-random")
    out = status(server.url, "--watch", "--interval", "0.1", "--iterations", "3").stdout
    frames = out.split("pipeline status")[1:]
    assert len(frames) == 3
    assert all("maxmemory-policy is allkeys-random" in frame for frame in frames)


def test_gather_status_reads_durability_only_when_asked(start_server: StartServer) -> None:
    """The metrics poller calls gather_status every few seconds: no CONFIG GET from it (an
    ACL that refuses it would log each one in the server's ACL LOG)."""
    from pipeline.runtime.status import Status, gather_status
    from tests.apps import app

    server = start_server()

    async def run() -> tuple[Status, dict[str, object], Status]:
        client = Redis.from_url(server.url)
        try:
            plain = await gather_status(client, Keys("g"), app)
            stats = await client.info("commandstats")
            checked = await gather_status(client, Keys("g"), app, durability=True)
            return plain, stats, checked
        finally:
            await client.aclose()

    plain, stats, checked = asyncio.run(run())
    assert plain.redis is None
    assert not [name for name in stats if name.startswith("cmdstat_config")]
    assert checked.redis is not None
    assert [f.code for f in checked.redis.findings] == ["no-persistence"]
