"""The tests use the same private redis-server as the demo and the benchmarks.

`TunedRedisServer` adds settings only the command line can give before the server loads its
data (e.g. the hidden `key-load-delay`, which makes a LOADING phase last long enough to see),
and a start that need not wait for the load to finish.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

import redis

from pipeline.runtime.embedded_redis import RedisServer, free_port, newest_redis_server

__all__ = ["RedisServer", "TunedRedisServer", "free_port", "newest_redis_server"]


class TunedRedisServer(RedisServer):
    """A `RedisServer` started with extra `--name value` settings (`extra`, changeable
    between restarts); `start(wait=False)` returns as soon as the process runs."""

    def __init__(
        self,
        workdir: Path,
        appendonly: bool = False,
        binary: str | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(workdir, appendonly=appendonly, binary=binary)
        self.extra = dict(extra or {})

    def start(self, wait: bool = True) -> TunedRedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.workdir), "--save", "", "--daemonize", "no",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        for name, value in self.extra.items():
            args += [f"--{name}", value]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait:
            self._wait_ready()
        return self


# ---- faults a test can put a live server into (tests/runtime/test_redis_errors.py and
# ---- tests/chaos/test_redis_faults.py) ----------------------------------------------------

#: Runs for ARGV[1] seconds of server time; past `busy-reply-threshold` every other client
#: gets BUSY (it touches no key, so SCRIPT KILL could stop it).
BUSY_SCRIPT = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local stop = now() + tonumber(ARGV[1])
while now() < stop do end
return 1
"""


def lower_busy_threshold(admin: redis.Redis, ms: int) -> None:
    """`busy-reply-threshold` (Redis 7), `lua-time-limit` before it."""
    try:
        admin.config_set("busy-reply-threshold", ms)
    except redis.ResponseError:
        admin.config_set("lua-time-limit", ms)


def run_busy_script(url: str, seconds: float) -> None:
    """Keep the server busy in a script for `seconds` (blocks the calling thread)."""
    client = redis.Redis.from_url(url, socket_timeout=seconds + 10)  # the reply comes at the end
    try:
        client.eval(BUSY_SCRIPT, 0, seconds)
    finally:
        client.close()


def replicate_nowhere(admin: redis.Redis) -> None:
    """`REPLICAOF` a port nobody listens on: the server turns read-only replica (READONLY)."""
    admin.execute_command("REPLICAOF", "127.0.0.1", free_port())


def stop_replicating(admin: redis.Redis) -> None:
    admin.execute_command("REPLICAOF", "NO", "ONE")
