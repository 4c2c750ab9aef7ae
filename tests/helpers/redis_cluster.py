"""A private Redis Cluster for the tests: 3 primaries + 3 replicas from the `redis-server` and
`redis-cli` binaries, each node a process of ours on free ports in a folder of its own.

`LocalRedisCluster(workdir).start()` starts the six servers (`cluster-enabled yes`, no
persistence), creates the cluster with `redis-cli --cluster create ... --cluster-replicas 1`,
and returns once every node says `cluster_state:ok`, every node sees the same primaries and
replicas, and every replica is in sync. `kill_primary(port)` SIGKILLs a primary,
`wait_failover(port)` waits for its replica to take over, `restart(port)` brings a killed
node back (it rejoins as a replica). `stop()` kills every node and removes the folder.

`LocalRedisCluster(workdir, tls=make_tls_files(folder))` speaks only TLS (clients, replication,
the cluster bus); its `url` is `rediss://...?ssl_ca_certs=<ca>`.

`ExistingRedisCluster(url)` is the same view of a cluster someone else runs
(`REDIS_CLUSTER_URL`, credentials and TLS options in the URL); it cannot kill nodes
(`can_kill` is False).

Each node has a data port and a cluster bus port, both picked free: the default bus port
(data port + 10000) of an ephemeral port may be taken or past 65535.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.connection import SSLConnection, parse_url

from pipeline.runtime.embedded_redis import newest_redis_server

__all__ = [
    "ClusterNode",
    "ExistingRedisCluster",
    "LocalRedisCluster",
    "RedisClusterBase",
    "TlsFiles",
    "make_tls_files",
    "redis_cli_for",
]

SLOTS = 16384


@dataclass(frozen=True)
class ClusterNode:
    """One node as the cluster sees it (`CLUSTER NODES`)."""

    node_id: str
    host: str
    port: int
    role: str  # "primary" or "replica"
    primary_id: str | None  # a replica's primary; None for a primary
    slots: tuple[tuple[int, int], ...]  # a primary's slot ranges, inclusive
    failed: bool  # flagged fail (or pfail) by the node we asked

    @property
    def slot_count(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.slots)


def parse_cluster_nodes(text: str) -> list[ClusterNode]:
    """`CLUSTER NODES` as a list of nodes (slot-migration markers skipped)."""
    nodes = []
    for line in text.strip().splitlines():
        fields = line.split()
        node_id, address, flags, primary = fields[0], fields[1], fields[2].split(","), fields[3]
        hostport = address.split("@")[0]
        host, _, port = hostport.rpartition(":")
        slots = []
        for item in fields[8:]:
            if item.startswith("["):  # [slot->-node] / [slot-<-node]: a migration
                continue
            lo, _, hi = item.partition("-")
            slots.append((int(lo), int(hi or lo)))
        nodes.append(
            ClusterNode(
                node_id=node_id,
                host=host,
                port=int(port),
                role="primary" if "master" in flags else "replica",
                primary_id=None if primary == "-" else primary,
                slots=tuple(sorted(slots)),
                failed="fail" in flags or "fail?" in flags,
            )
        )
    return nodes


def info_fields(text: str) -> dict[str, str]:
    """`CLUSTER INFO` (or any INFO-shaped text) as a dict of strings."""
    out = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition(":")
        if sep:
            out[name] = value
    return out


def redis_cli_for(server_binary: str) -> str | None:
    """The `redis-cli` beside `server_binary`, else the one on PATH."""
    beside = Path(server_binary).with_name("redis-cli")
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("redis-cli")


@dataclass(frozen=True)
class TlsFiles:
    """A test CA and one certificate (for 127.0.0.1) every node serves and presents."""

    ca_cert: Path
    cert: Path
    key: Path


def make_tls_files(folder: Path) -> TlsFiles | None:
    """A CA and a node certificate for 127.0.0.1 made with `openssl` (None without it)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(folder / "ca.crt", folder / "node.crt", folder / "node.key")
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
         "-keyout", "ca.key", "-out", "ca.crt"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", "node.key", "-out", "node.csr"],
        ["x509", "-req", "-in", "node.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "node.crt"],
    ]  # fmt: skip
    for step in steps:
        subprocess.run([openssl, *step], cwd=folder, check=True, capture_output=True)
    return files


def _free_ports(n: int) -> list[int]:
    """`n` distinct free ports (all sockets held open until every port is picked)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


class RedisClusterBase:
    """What a test sees of a cluster: a URL, the nodes and their roles, waiting for health."""

    #: Whether the nodes are processes of ours (they can be killed and restarted).
    can_kill = False

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        scheme: str = "redis",
        userinfo: str = "",
        query: str = "",
        connect_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """`scheme`, `userinfo` (`user:password@`) and `query` go into `url`;
        `connect_kwargs` (TLS, credentials) into every connection the helper opens."""
        self.host = host
        self._scheme, self._userinfo, self._query = scheme, userinfo, query
        self._connect_kwargs = dict(connect_kwargs or {})
        self._entry_port = 0  # the node `url` names while it answers

    # ---- looking at the cluster ------------------------------------------------------------

    def _client(self, port: int, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(
            host=self.host,
            port=port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            **self._connect_kwargs,
        )

    def node_client(self, port: int, timeout: float = 5.0) -> redis.Redis:
        """A plain (not cluster) client on the node on `port`; the caller closes it."""
        return self._client(port, timeout)

    def url_of(self, port: int) -> str:
        """The URL of the node on `port`, with this cluster's scheme, credentials, options."""
        query = f"?{self._query}" if self._query else ""
        return f"{self._scheme}://{self._userinfo}{self.host}:{port}{query}"

    def ask(self, port: int, *command: str) -> str | None:
        """A command's reply as text from the node on `port`; None if it does not answer."""
        client = self._client(port)
        try:
            reply = client.execute_command(*command)  # type: ignore[no-untyped-call]
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return None
        finally:
            client.close()
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    def _info(self, port: int, section: str) -> dict[str, object]:
        """One INFO section of the node on `port` ({} if it does not answer)."""
        client = self._client(port)
        try:
            return dict(client.info(section))
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return {}
        finally:
            client.close()

    def live_ports(self) -> list[int]:
        """The ports of the nodes answering now."""
        raise NotImplementedError

    def _view(self, port: int) -> list[ClusterNode] | None:
        text = self.ask(port, "CLUSTER", "NODES")
        return None if text is None else parse_cluster_nodes(text)

    @property
    def nodes(self) -> list[ClusterNode]:
        """Every node, as a live node sees them now (roles change on a failover)."""
        for port in self.live_ports():
            view = self._view(port)
            if view is not None:
                return sorted(view, key=lambda n: n.port)
        raise RuntimeError("no cluster node answers")

    @property
    def primaries(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.role == "primary" and not n.failed]

    @property
    def replicas(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.role == "replica" and not n.failed]

    def replica_of(self, port: int) -> ClusterNode:
        """The (first live) replica of the primary on `port`."""
        nodes = self.nodes
        primary = next(n for n in nodes if n.port == port)
        if primary.role != "primary":
            raise ValueError(f"node {port} is a replica")
        for node in nodes:
            if node.primary_id == primary.node_id and not node.failed:
                return node
        raise LookupError(f"primary {port} has no live replica")

    @property
    def url(self) -> str:
        """`redis://host:<port>` (`rediss://` with TLS) of one live primary (the same one
        while it lives and leads)."""
        live = set(self.live_ports())
        if self._entry_port not in live or self._role_of(self._entry_port) != "master":
            self._entry_port = next(n.port for n in self.primaries if n.port in live)
        return self.url_of(self._entry_port)

    def _role_of(self, port: int) -> str | None:
        client = self._client(port)
        try:
            role = client.role()
        except redis.RedisError:
            return None
        finally:
            client.close()
        first = role[0]
        return first.decode() if isinstance(first, bytes) else str(first)

    def client(self, **kwargs: Any) -> redis.RedisCluster:
        """A (sync) cluster client on `url`; the caller closes it."""
        return redis.RedisCluster.from_url(self.url, **kwargs)

    # ---- waiting for health -----------------------------------------------------------------

    def healthy(self, primaries: int | None = None, replicas: int | None = None) -> bool:
        """Every live node says `cluster_state:ok` with all slots served, each sees the same
        live primaries and replicas (with the counts asked for), and each replica's link to
        its primary is up with no sync in progress."""
        ports = self.live_ports()
        views = []
        for port in ports:
            info = self.ask(port, "CLUSTER", "INFO")
            if info is None:
                return False
            fields = info_fields(info)
            served = fields.get("cluster_slots_ok") == str(SLOTS)
            if fields.get("cluster_state") != "ok" or not served:
                return False
            view = self._view(port)
            if view is None:
                return False
            live = {(n.port, n.role, n.primary_id) for n in view if not n.failed}
            views.append(live)
        if not views or any(v != views[0] for v in views):
            return False
        roles = [role for _, role, _ in views[0]]
        if primaries is not None and roles.count("primary") != primaries:
            return False
        if replicas is not None and roles.count("replica") != replicas:
            return False
        for port, role, _ in views[0]:
            if role == "replica" and port in ports:
                link = self._info(port, "replication")
                if link.get("master_link_status") != "up":
                    return False
                if link.get("master_sync_in_progress") != 0:
                    return False
        return True

    def wait_healthy(
        self, timeout: float = 20.0, primaries: int | None = None, replicas: int | None = None
    ) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy(primaries, replicas):
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not healthy after {timeout}s: {self._describe()}")
            time.sleep(0.05)

    def _describe(self) -> str:
        parts = []
        for port in self.live_ports():
            info = info_fields(self.ask(port, "CLUSTER", "INFO") or "")
            parts.append(f"{port}:{info.get('cluster_state', '?')}")
        return ", ".join(parts) or "no node answers"

    # ---- faults (only on a cluster of our own) -----------------------------------------------

    def kill_primary(self, port: int) -> ClusterNode:
        raise NotImplementedError("not a cluster of our own: its nodes cannot be killed")

    def wait_failover(self, port: int, timeout: float = 30.0) -> ClusterNode:
        raise NotImplementedError("not a cluster of our own: its nodes cannot be killed")

    def restart(self, port: int, timeout: float = 30.0) -> None:
        raise NotImplementedError("not a cluster of our own: its nodes cannot be restarted")

    def stop(self) -> None:
        pass


class LocalRedisCluster(RedisClusterBase):
    """A cluster of our own processes: `primaries` primaries, each with `replicas_per` replicas.

    `node_timeout_ms` is `cluster-node-timeout`: how long a silent primary takes to be failed
    over (a failover takes about twice that). Short keeps failover tests quick; too short
    fails nodes over on a loaded machine.
    """

    can_kill = True

    def __init__(
        self,
        workdir: Path,
        primaries: int = 3,
        replicas_per: int = 1,
        node_timeout_ms: int = 2000,
        binary: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        """`tls`: every node speaks only TLS (clients, replication, the cluster bus), with
        the CA in `url` (`rediss://...?ssl_ca_certs=<ca>`); no client certificate needed."""
        if tls is None:
            super().__init__()
        else:
            super().__init__(
                scheme="rediss",
                query=f"ssl_ca_certs={tls.ca_cert}",
                connect_kwargs={"ssl": True, "ssl_ca_certs": str(tls.ca_cert)},
            )
        self.tls = tls
        found = binary or newest_redis_server()
        if not found:
            raise FileNotFoundError("no redis-server found: install Redis")
        cli = redis_cli_for(found)
        if not cli:
            raise FileNotFoundError("no redis-cli found beside redis-server nor on PATH")
        self.binary, self.cli = found, cli
        self.workdir = workdir
        self.replicas_per = replicas_per
        self.node_timeout_ms = node_timeout_ms
        count = primaries * (1 + replicas_per)
        picked = _free_ports(2 * count)
        self.ports = picked[:count]
        self._bus = dict(zip(self.ports, picked[count:], strict=True))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._entry_port = self.ports[0]
        self._counts = (primaries, primaries * replicas_per)
        self._lost_slots: dict[int, tuple[tuple[int, int], ...]] = {}

    def live_ports(self) -> list[int]:
        return [port for port, proc in self.procs.items() if proc.poll() is None]

    def node_dir(self, port: int) -> Path:
        return self.workdir / str(port)

    def _spawn(self, port: int) -> None:
        folder = self.node_dir(port)
        folder.mkdir(parents=True, exist_ok=True)
        if self.tls is None:
            listen = ["--port", str(port)]
        else:
            listen = [
                "--port", "0", "--tls-port", str(port),
                "--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca_cert), "--tls-auth-clients", "no",
                "--tls-cluster", "yes", "--tls-replication", "yes",
            ]  # fmt: skip
        args = [
            self.binary, *listen, "--bind", "127.0.0.1",
            "--cluster-port", str(self._bus[port]),
            "--dir", str(folder), "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # A replica whose link broke a while ago may still take over (tests kill on purpose).
            "--cluster-replica-validity-factor", "0",
            # Replicas sync at once (the default waits 5 s for more replicas to join a sync).
            "--repl-diskless-sync-delay", "0",
            "--logfile", str(folder / "redis.log"),
        ]  # fmt: skip
        self.procs[port] = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _wait_up(self, port: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.ask(port, "PING") is None:
            proc = self.procs[port]
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.node_dir(port)}/redis.log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on {port} not ready")
            time.sleep(0.02)

    def start(self, timeout: float = 30.0) -> LocalRedisCluster:
        try:
            for port in self.ports:
                self._spawn(port)
            for port in self.ports:
                self._wait_up(port)
            create = [
                self.cli, "--cluster", "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas", str(self.replicas_per), "--cluster-yes",
            ]  # fmt: skip
            if self.tls is not None:
                create += ["--tls", "--cacert", str(self.tls.ca_cert)]
            done = subprocess.run(create, capture_output=True, text=True, timeout=timeout)
            if done.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}"
                )
            primaries, replicas = self._counts
            self.wait_healthy(timeout, primaries=primaries, replicas=replicas)
            self._entry_port = self.primaries[0].port
        except BaseException:
            self.stop()
            raise
        return self

    def kill_primary(self, port: int) -> ClusterNode:
        """SIGKILL the primary on `port`; returns the replica expected to take over."""
        primary = next(n for n in self.nodes if n.port == port)
        replica = self.replica_of(port)
        self._lost_slots[port] = primary.slots
        proc = self.procs[port]
        proc.kill()
        proc.wait(10)
        return replica

    def fail_over(self, port: int, timeout: float = 20.0) -> int:
        """Hand the slots of the primary on `port` to its replica, as an operator would
        (`CLUSTER FAILOVER`: the replica catches up first, then takes over); returns the new
        primary's port once it says so."""
        replica = self.replica_of(port).port
        if self.ask(replica, "CLUSTER", "FAILOVER") != "OK":
            raise RuntimeError(f"{replica} refused CLUSTER FAILOVER")
        deadline = time.monotonic() + timeout
        while self._role_of(replica) != "master":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{replica} did not take over from {port}: {self._describe()}")
            time.sleep(0.05)
        return replica

    def wait_failover(self, port: int, timeout: float = 30.0) -> ClusterNode:
        """Wait until another primary serves the slots of the primary killed on `port` and
        every live node says `cluster_state:ok` again (all slots served, one view of the
        roles); returns the primary that took over."""
        slots = self._lost_slots[port]
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(RuntimeError):
                heir = [
                    n for n in self.nodes
                    if n.port != port and n.role == "primary" and not n.failed
                    and n.slots and set(slots) <= set(n.slots)
                ]  # fmt: skip
                if heir and self.healthy(primaries=self._counts[0]):
                    return heir[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no replica of {port} took over: {self._describe()}")
            time.sleep(0.05)

    def restart(self, port: int, timeout: float = 30.0) -> None:
        """Start a killed node again on its port and folder (its nodes.conf rejoins it as a
        replica of whoever took over); returns once the cluster is whole and in sync."""
        proc = self.procs.get(port)
        if proc is not None and proc.poll() is None:
            raise RuntimeError(f"node {port} is running")
        self._spawn(port)
        self._wait_up(port)
        primaries, replicas = self._counts
        self.wait_healthy(timeout, primaries=primaries, replicas=replicas)

    def stop(self) -> None:
        """Kill every node and remove the folder."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)


class ExistingRedisCluster(RedisClusterBase):
    """A cluster someone else runs, named by a URL of any of its nodes."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        for name in ("host", "port", "db", "path"):
            options.pop(name, None)
        if options.pop("connection_class", None) is SSLConnection:
            options["ssl"] = True
        userinfo = parts.netloc.rpartition("@")[0]
        super().__init__(
            parts.hostname or "127.0.0.1",
            scheme=parts.scheme,
            userinfo=f"{userinfo}@" if userinfo else "",
            query=parts.query,
            connect_kwargs=options,
        )
        self._seed = parts.port or 6379
        self._entry_port = self._seed

    def live_ports(self) -> list[int]:
        seen = self._view(self._seed) or []
        ports = [n.port for n in seen if not n.failed] or [self._seed]
        return [p for p in ports if self.ask(p, "PING") is not None]
