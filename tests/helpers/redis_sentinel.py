"""A primary, a replica and three sentinels from the `redis-server` binary, for tests of
Sentinel-managed primaries (`redis+sentinel://`, `pipeline.runtime.redis_sentinel`)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from pipeline.runtime.embedded_redis import free_port, newest_redis_server

SERVICE = "pipeline-primary"


class LocalSentinels:
    """`primary` and `replica` ports, `sentinels` ports; `url` names them all."""

    def __init__(self, workdir: Path, down_after_ms: int = 1000) -> None:
        self.workdir = workdir
        self.binary = newest_redis_server()
        self.primary, self.replica = free_port(), free_port()
        self.sentinels = [free_port() for _ in range(3)]
        self.down_after_ms = down_after_ms
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def _spawn(self, port: int, *args: str) -> None:
        folder = self.workdir / str(port)
        folder.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [self.binary, *args, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
             "--save", "", "--appendonly", "no", "--logfile", str(folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def start(self) -> LocalSentinels:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._spawn(self.primary)
        self._wait(self.primary)
        self._spawn(self.replica, "--replicaof", "127.0.0.1", str(self.primary))
        self._wait(self.replica)
        for port in self.sentinels:
            conf = self.workdir / f"sentinel-{port}.conf"
            conf.write_text(
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
            )
            self._spawn(port, str(conf), "--sentinel")
        for port in self.sentinels:
            self._wait(port)
        self.wait_primary(self.primary)
        return self

    def _wait(self, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with redis.Redis(port=port, socket_timeout=1) as client:
                    client.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def primary_named(self) -> int | None:
        """The primary's port, as the first sentinel that answers says."""
        for port in self.sentinels:
            try:
                with redis.Redis(port=port, socket_timeout=1) as client:
                    host_port = client.sentinel_get_master_addr_by_name(SERVICE)
            except redis.RedisError:
                continue
            if host_port:
                return int(host_port[1])
        return None

    def wait_primary(self, port: int, timeout: float = 30.0) -> None:
        """Until the sentinels name `port` the primary and the replica has synced."""
        deadline = time.monotonic() + timeout
        while self.primary_named() != port or not self._replica_in_sync():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the sentinels do not name {port} the primary")
            time.sleep(0.1)

    def _replica_in_sync(self) -> bool:
        try:
            with redis.Redis(port=self.primary, socket_timeout=1) as client:
                info = client.info("replication")
        except redis.RedisError:
            return True  # the primary is gone: nothing to sync with
        return int(info.get("connected_slaves", 0)) >= 1

    def wait_replica_synced(self, timeout: float = 10.0) -> None:
        """Until the replica has everything the primary wrote (its replication offset)."""
        deadline = time.monotonic() + timeout
        with redis.Redis(port=self.primary) as primary, redis.Redis(port=self.replica) as replica:
            while True:
                wrote = int(primary.info("replication")["master_repl_offset"])
                has = int(replica.info("replication").get("slave_repl_offset", -1))
                if has >= wrote:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the replica has {has} of {wrote}")
                time.sleep(0.02)

    def kill_primary(self) -> int:
        """SIGKILL the primary; returns the replica's port, which the sentinels promote."""
        proc = self.procs.pop(self.primary)
        proc.kill()
        proc.wait(10)
        return self.replica

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
        for proc in self.procs.values():
            proc.wait(10)
        self.procs.clear()
