"""Settings: defaults <- TOML file <- environment, validated once at start.

A bad value raises `ConfigError` naming the field (`runtime.lease_ms`), so an operator
sees what to fix instead of a traceback from deep inside a worker.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec

from pipeline.errors import ConfigError

_T = TypeVar("_T")
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


class RetrySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Durable delayed retries (exponential backoff with jitter, capped)."""

    max_attempts: PosInt = 6
    base_ms: PosInt = 1000
    max_ms: PosInt = 300_000
    promote_every_ms: PosInt = 250


class DlqSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    maxlen: PosInt = 100_000
    # Field values longer than this are cut in the DLQ copy, so poison cannot bloat it.
    max_field_bytes: PosInt = 64 * 1024


class ResultSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    ttl_s: PosInt = 3600
    done_maxlen: PosInt = 100_000


class ClaudeSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The Anthropic API. The key comes from ANTHROPIC_API_KEY only (never from a file)."""

    # None: ANTHROPIC_BASE_URL if set, else the SDK's default (the real API).
    base_url: str | None = None
    timeout_s: PosFloat = 600.0
    default_max_tokens: PosInt = 1024
    # The model id each family alias means; the router hands on one stream per family.
    models: dict[str, str] = msgspec.field(
        default_factory=lambda: {
            "haiku": "claude-haiku-5-5",
            "sonnet": "claude-sonnet-5-5",
            "opus": "claude-opus-5-5",
        }
    )
    # How long a stage pauses after the API refuses the credentials (401/403).
    auth_pause_s: PosFloat = 30.0


class RouteRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[[router.rules]]`: when every condition given holds, an `auto` task goes to `family`
    (or to the full model id `model`). Bounds are inclusive; `max_tokens` is the requested
    one (before caps). Checked at start by `pipeline.routing.check_router`."""

    types: list[str] = msgspec.field(default_factory=list)  # empty: any task type
    min_prompt_chars: NonNegInt | None = None
    max_prompt_chars: NonNegInt | None = None
    min_max_tokens: PosInt | None = None
    max_max_tokens: PosInt | None = None
    family: str | None = None
    model: str | None = None


def _default_route_rules() -> list[RouteRule]:
    """Short classification/extraction work, and short summaries, go to Haiku."""
    return [
        RouteRule(
            types=["classify", "extract", "moderate", "translate"],
            max_prompt_chars=24_000,
            family="haiku",
        ),
        RouteRule(
            types=["summarise", "summarize"],
            max_prompt_chars=12_000,
            max_max_tokens=1024,
            family="haiku",
        ),
    ]


class RouterSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where `model=auto` tasks go (first matching rule, else `default_family`), and
    per-type max_tokens caps (for every task). Rules given in a file replace the defaults."""

    default_family: str = "sonnet"
    rules: list[RouteRule] = msgspec.field(default_factory=_default_route_rules)
    # task type -> highest max_tokens allowed.
    max_tokens_caps: dict[str, PosInt] = msgspec.field(default_factory=dict)


#: Router settings replaced by `[[router.rules]]`: a clear error rather than "unknown setting".
_MOVED_ROUTER_SETTINGS = {
    "types": 'write [[router.rules]] types = ["classify"] family = "haiku" (docs/ROUTING.md)',
    "long_prompt_chars": "give max_prompt_chars in each [[router.rules]] (docs/ROUTING.md)",
}


class CacheSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The exact response cache (only complete, successful answers are cached)."""

    enabled: bool = True
    ttl_s: PosInt = 24 * 3600
    # task type -> seconds its answers stay cached; 0 or false: never cache it; true: ttl_s.
    ttl_by_type: dict[str, int | bool] = msgspec.field(default_factory=dict)

    def ttl_for(self, task_type: str) -> int:
        """Seconds to cache answers of this task type; 0: not cached at all."""
        ttl = self.ttl_by_type.get(task_type, True)
        if not self.enabled or ttl is False:
            return 0
        return self.ttl_s if ttl is True else ttl


class IngressSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Input bounds and backpressure for producers."""

    # `submit` raises Backpressure when the ingress stream holds more than this.
    max_backlog: PosInt = 1_000_000
    max_prompt_bytes: PosInt = 1024 * 1024
    max_metadata_bytes: PosInt = 16 * 1024


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything a process needs; built by `load_settings`."""

    prefix: str = "pipeline"
    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    runtime: RuntimeSettings = msgspec.field(default_factory=RuntimeSettings)
    retry: RetrySettings = msgspec.field(default_factory=RetrySettings)
    dlq: DlqSettings = msgspec.field(default_factory=DlqSettings)
    results: ResultSettings = msgspec.field(default_factory=ResultSettings)
    claude: ClaudeSettings = msgspec.field(default_factory=ClaudeSettings)
    router: RouterSettings = msgspec.field(default_factory=RouterSettings)
    cache: CacheSettings = msgspec.field(default_factory=CacheSettings)
    ingress: IngressSettings = msgspec.field(default_factory=IngressSettings)
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


_ENV_ALIASES = {"REDIS_URL": ("redis", "url"), "PIPELINE_PREFIX": ("prefix",)}
_ENV_NESTED = re.compile(r"^PIPELINE_([A-Z]+)__([A-Z0-9_]+)$")


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Merge defaults <- TOML (`path`, else `PIPELINE_CONFIG`) <- env <- keyword overrides.

    Env names: `REDIS_URL`, `PIPELINE_PREFIX`, and `PIPELINE_<SECTION>__<FIELD>`
    (e.g. `PIPELINE_RUNTIME__LEASE_MS=20000`).
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
    for dotted, value in overrides.items():
        _set_path(raw, tuple(dotted.split("__")), value)
    for stage, override in (raw.get("stages") or {}).items():
        if not isinstance(override, dict):
            raise ConfigError(f"stages.{stage}", "must be a table of runtime settings")
    for name, hint in _MOVED_ROUTER_SETTINGS.items():
        if isinstance(raw.get("router"), dict) and name in raw["router"]:
            raise ConfigError(f"router.{name}", f"replaced by router rules: {hint}")
    settings = _convert(raw, Settings, "")
    _check(settings)
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


def _check(settings: Settings) -> None:
    """Checks that span fields (ranges are checked by the types)."""
    _check_timeouts(settings.redis, settings.runtime, "runtime")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", settings.prefix):
        allowed = "letters, digits, '_', '-', '.'"
        raise ConfigError("prefix", f"only {allowed} allowed: {settings.prefix!r}")
    if not settings.redis.url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("redis.url", "must start with redis://, rediss:// or unix://")
    from pipeline.routing import check_router  # routing imports this module

    check_router(settings)
    for task_type, ttl in settings.cache.ttl_by_type.items():
        if not isinstance(ttl, bool) and ttl < 0:
            raise ConfigError(f"cache.ttl_by_type.{task_type}", f"{ttl} is negative (0: no cache)")
    for stage in settings.stages:
        settings.runtime_for(stage)


def _check_timeouts(redis: RedisSettings, runtime: RuntimeSettings, where: str) -> None:
    if redis.socket_timeout_s * 1000 <= runtime.block_ms:
        raise ConfigError(
            "redis.socket_timeout_s",
            f"must exceed {where}.block_ms ({runtime.block_ms} ms) or blocked reads time out",
        )
