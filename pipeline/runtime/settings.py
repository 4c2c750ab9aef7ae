"""Settings of the runtime: defaults <- TOML file <- environment, validated once at start.

A bad value raises `ConfigError` naming the field (`runtime.lease_ms`), so an operator
sees what to fix instead of a traceback from deep inside a worker. `load` fills any
subclass of `BaseSettings`: the application's settings add their own sections to the
runtime's (`pipeline.claude.settings.Settings` does).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from pipeline.runtime.errors import ConfigError
from pipeline.runtime.redis_sentinel import is_sentinel_url
from pipeline.runtime.redis_sentinel import parse as parse_sentinel_url

__all__ = [
    "BaseSettings",
    "DlqSettings",
    "MetricsSettings",
    "NonNegFloat",
    "NonNegInt",
    "PosFloat",
    "PosInt",
    "RedisSettings",
    "ResultSettings",
    "RetrySettings",
    "RuntimeSettings",
    "load",
]

_T = TypeVar("_T")
_S = TypeVar("_S", bound="BaseSettings")
PosInt = Annotated[int, msgspec.Meta(gt=0)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]


class RedisSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to reach Redis; `rediss://` and passwords in the URL work."""

    url: str = "redis://localhost:6379/0"
    max_connections: PosInt = 64
    connect_timeout_s: PosFloat = 5.0
    # Must exceed runtime.block_ms, or a blocked XREADGROUP times out client-side.
    socket_timeout_s: PosFloat = 10.0
    #: Partitions of every stage's streams (docs/CLUSTER.md): unset, none on one node and
    #: `CLUSTER_PARTITIONS` on a Redis Cluster (which needs them). Every process of one
    #: deployment must agree on it.
    partitions: Annotated[int, msgspec.Meta(ge=0, le=4096)] | None = None
    #: "replicated": a hand-off batch, a moved task, a published result and a paid call's
    #: record count only once `replicas` replicas hold them (`pipeline.runtime.replication`;
    #: one round trip more per batch). "acknowledged": once the primary has them.
    durability: Literal["acknowledged", "replicated"] = "acknowledged"
    replicas: PosInt = 1
    replica_timeout_ms: PosInt = 1000


#: Partitions on a Redis Cluster when `redis.partitions` is not set: enough for a few dozen
#: primaries, few enough that a worker serving all of them reads them cheaply.
CLUSTER_PARTITIONS = 16


class RuntimeSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The consumer loop: prefetch, leases, reclaim, shutdown."""

    concurrency: PosInt = 64
    read_count: PosInt = 256
    block_ms: PosInt = 2000
    lease_ms: PosInt = 15_000
    reclaim_every_ms: PosInt = 1000
    max_deliveries: PosInt = 5
    grace_s: NonNegFloat = 20.0
    max_entry_bytes: PosInt = 4 * 1024 * 1024
    handoff_batch: PosInt = 512
    # Consumer names with nothing pending and no read for this long are forgotten.
    prune_idle_ms: PosInt = 3_600_000


class RetrySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Durable delayed retries (exponential backoff with jitter, capped)."""

    max_attempts: PosInt = 6
    base_ms: PosInt = 1000
    max_ms: PosInt = 300_000
    promote_every_ms: PosInt = 250


class DlqSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The dead-letter stream, bounded by letters and by bytes (the oldest go first)."""

    maxlen: PosInt = 100_000
    max_bytes: PosInt = 1024 * 1024 * 1024
    # Field values longer than this are cut in the readable copy a letter shows (its
    # `entry` keeps the original whole, for replay).
    max_field_bytes: PosInt = 16 * 1024


class ResultSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    ttl_s: PosInt = 3600
    # A task's record (its id's idempotency, its paid call and answer) lives this long while
    # the task has no result yet; then it expires with the result.
    live_ttl_s: PosInt = 7 * 24 * 3600
    done_maxlen: PosInt = 100_000


class MetricsSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Worker metrics (docs/OBSERVABILITY.md): a Prometheus scrape endpoint when `port` is set
    (0: any free port; `pipeline worker --metrics-port` overrides), and the queue poll."""

    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    host: str = "0.0.0.0"
    poll_s: PosFloat = 5.0


class BaseSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the runtime reads: the key prefix, Redis, the consumer loop, retries, the DLQ,
    results and metrics, plus per-stage overrides of the loop."""

    prefix: str = "pipeline"
    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    runtime: RuntimeSettings = msgspec.field(default_factory=RuntimeSettings)
    retry: RetrySettings = msgspec.field(default_factory=RetrySettings)
    dlq: DlqSettings = msgspec.field(default_factory=DlqSettings)
    results: ResultSettings = msgspec.field(default_factory=ResultSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
    # Per-stage overrides of runtime settings, e.g. [stages.claude-call] concurrency = 2000.
    stages: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)

    def runtime_for(self, stage: str) -> RuntimeSettings:
        """Runtime settings with the stage's own overrides applied."""
        override = self.stages.get(stage)
        if not override:
            return self.runtime
        merged = {**msgspec.structs.asdict(self.runtime), **override}
        runtime = _convert(merged, RuntimeSettings, f"stages.{stage}")
        _check_timeouts(self.redis, runtime, f"stages.{stage}")
        return runtime

    def check(self) -> None:
        """Checks that span fields (ranges are checked by the types); subclasses add theirs."""
        _check_timeouts(self.redis, self.runtime, "runtime")
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.prefix):
            allowed = "letters, digits, '_', '-', '.'"
            raise ConfigError("prefix", f"only {allowed} allowed: {self.prefix!r}")
        if is_sentinel_url(self.redis.url):
            parse_sentinel_url(self.redis.url)  # a bad one names what is wrong
        elif not self.redis.url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                "redis.url", "must start with redis://, rediss://, unix:// or redis+sentinel://"
            )
        for stage in self.stages:
            self.runtime_for(stage)


_ENV_ALIASES = {"REDIS_URL": ("redis", "url"), "PIPELINE_PREFIX": ("prefix",)}
_ENV_NESTED = re.compile(r"^PIPELINE_([A-Z]+)__([A-Z0-9_]+)$")


def load(
    kind: type[_S],
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    check_raw: Callable[[dict[str, Any]], None] | None = None,
) -> _S:
    """Merge defaults <- TOML (`path`, else `PIPELINE_CONFIG`) <- env <- `overrides`, into
    `kind`, then run its `check`. `check_raw` sees the merged tables before conversion.

    Env names: `REDIS_URL`, `PIPELINE_PREFIX`, and `PIPELINE_<SECTION>__<FIELD>`
    (e.g. `PIPELINE_RUNTIME__LEASE_MS=20000`); overrides are `section__field=value`.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    path = path or env.get("PIPELINE_CONFIG") or None
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError("config", f"file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    for name, value in env.items():
        if name in _ENV_ALIASES:
            _set_path(raw, _ENV_ALIASES[name], value)
        elif match := _ENV_NESTED.match(name):
            section, field = match.group(1).lower(), match.group(2).lower()
            _set_path(raw, (section, field), value)
    for dotted, value in (overrides or {}).items():
        _set_path(raw, tuple(dotted.split("__")), value)
    for stage, override in (raw.get("stages") or {}).items():
        if not isinstance(override, dict):
            raise ConfigError(f"stages.{stage}", "must be a table of runtime settings")
    if check_raw is not None:
        check_raw(raw)
    settings = _convert(raw, kind, "")
    settings.check()
    return settings


def _set_path(raw: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(".".join(path), "conflicts with a scalar setting")
    node[path[-1]] = value


def _convert(raw: Any, kind: type[_T], where: str) -> _T:
    try:
        # strict=False lets env strings ("20000", "true") convert to typed fields.
        return msgspec.convert(raw, kind, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        problem, _, at = text.partition(" - at `$")
        field = at.rstrip("`").lstrip(".")
        if problem.startswith("Object contains unknown field"):
            field = ".".join(p for p in (field, problem.split("`")[1]) if p)
            problem = "unknown setting"
        name = ".".join(p for p in (where, field) if p) or "config"
        raise ConfigError(name, problem or text) from None


def _check_timeouts(redis: RedisSettings, runtime: RuntimeSettings, where: str) -> None:
    if redis.socket_timeout_s * 1000 <= runtime.block_ms:
        raise ConfigError(
            "redis.socket_timeout_s",
            f"must exceed {where}.block_ms ({runtime.block_ms} ms) or blocked reads time out",
        )
