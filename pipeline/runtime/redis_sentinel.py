"""Primaries managed by Redis Sentinel, named by a URL of their own.

    redis+sentinel://[user:password@]host:port[,host:port...]/<service>[/<db>]
    rediss+sentinel://...   TLS to Redis (and to the sentinels)

The hosts are the sentinels; `<service>` is the name they monitor (`sentinel monitor
<service> ...`); the credentials are Redis's. Sentinels that need a password of their own
take `?sentinel_password=...` (and `sentinel_username=`). TLS options (`ssl_ca_certs=`, ...)
go in the query as for `rediss://`.

The client asks a sentinel for the primary before each new connection and follows a
failover: connections to the old primary fail once, as in any outage, and are made again to
the new one (`Availability.call` waits that out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from pipeline.runtime.errors import ConfigError

__all__ = ["SentinelTarget", "is_sentinel_url", "master_client", "parse"]

SCHEMES = ("redis+sentinel", "rediss+sentinel")
#: The options the query may carry for the Redis connections (the rest is refused).
_TLS_OPTIONS = {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
                "ssl_check_hostname"}  # fmt: skip


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    sentinel_auth: dict[str, str] = field(default_factory=dict)
    tls_options: dict[str, Any] = field(default_factory=dict)


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0] in SCHEMES


def parse(url: str) -> SentinelTarget:
    """The sentinels, service and credentials a `redis+sentinel://` URL names; a bad one is
    a `ConfigError` on `redis.url`."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise ConfigError("redis.url", f"a sentinel is host:port, got {host!r} in {url!r}")
        sentinels.append((name.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError(
            "redis.url", "name the monitored service: redis+sentinel://host:port/<service>[/db]"
        )
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if colon else None)
    query = dict(parse_qsl(parts.query))
    sentinel_auth = {
        key.removeprefix("sentinel_"): query.pop(key)
        for key in ("sentinel_username", "sentinel_password")
        if key in query
    }
    unknown = set(query) - _TLS_OPTIONS
    if unknown:
        raise ConfigError("redis.url", f"unknown option(s) in the sentinel URL: {sorted(unknown)}")
    return SentinelTarget(
        sentinels, path[0], int(path[1]) if len(path) == 2 else 0, username, password,
        parts.scheme == "rediss+sentinel", sentinel_auth, dict(query),
    )  # fmt: skip


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A sentinel-managed pool whose callers wait for a free connection (as `connect`'s
    pool does) instead of failing when all are busy."""


def master_client(
    url: str, *, max_connections: int, pool_timeout: float | None, **connection: Any
) -> Redis:
    """A client of the primary a `redis+sentinel://` URL names, its pool of
    `max_connections` waiting up to `pool_timeout` for a free one (None: as long as it
    takes; a pool of one serves as a single connection). `connection`: socket timeouts, a
    client name."""
    target = parse(url)
    tls: dict[str, Any] = {"ssl": True, **target.tls_options} if target.tls else {}
    sentinel_kwargs: dict[str, Any] = {
        key: value for key, value in connection.items() if key.startswith("socket_")
    }
    sentinel_kwargs.update(target.sentinel_auth)
    sentinel_kwargs.update(tls)
    sentinel = Sentinel(target.sentinels, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    client: Redis = sentinel.master_for(
        target.service,
        connection_pool_class=_BlockingSentinelPool,
        max_connections=max_connections,
        timeout=pool_timeout,
        db=target.db,
        username=target.username,
        password=target.password,
        **tls,
        **connection,
    )
    return client
