"""The pipeline's settings: the runtime's sections plus the Claude domain's (the API,
routing, the cache, ingress bounds, budgets, prices, the ledger and rate limits).

`pipeline.claude.config.load_settings` is the one way a process gets them: defaults <- TOML
<- environment, each field checked once at start.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from pipeline.runtime.errors import ConfigError
from pipeline.runtime.settings import (
    BaseSettings,
    DlqSettings,
    MetricsSettings,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    RedisSettings,
    ResultSettings,
    RetrySettings,
    RuntimeSettings,
)

__all__ = [
    "ApiKeySettings",
    "BudgetSettings",
    "CacheSettings",
    "ClaudeSettings",
    "DlqSettings",
    "FamilyLimits",
    "FamilyRule",
    "IngressSettings",
    "LedgerSettings",
    "MetricsSettings",
    "ModelPrice",
    "PriceSettings",
    "PriceTableSettings",
    "RateLimitSettings",
    "RedisSettings",
    "ResultSettings",
    "RetrySettings",
    "RouteRule",
    "RouterSettings",
    "RuntimeSettings",
    "Settings",
    "check_moved_settings",
]


class FamilyRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[[claude.families]]`: a model id matching any glob of `match` (`*`, `?`, `[...]`,
    against the lower-cased id) goes to `family`'s lane. Rules are read in order, after the
    aliases and configured ids and before the built-in rule (a `claude` id naming a family):
    applied by `pipeline.claude.routing.family_of`, checked at start by `check_families`."""

    family: str
    match: list[str]


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
    # Which family's lane other model ids take, for ids that name none (docs/ROUTING.md).
    families: list[FamilyRule] = msgspec.field(default_factory=list)
    # How long a stage pauses after the API refuses the credentials (401/403).
    auth_pause_s: PosFloat = 30.0
    # Calls asking for this many output tokens or more are streamed, and so are calls with
    # extended thinking: the SDK's own line (at its assumed 128k output tokens an hour, a
    # longer answer may take over 10 minutes, which proxies cut as an idle connection).
    stream_from_max_tokens: PosInt = 21_333
    # A streamed call: the longest wait for its first byte and between events (the API
    # sends pings), and the longest the whole call may take.
    stream_idle_timeout_s: PosFloat = 60.0
    stream_timeout_s: PosFloat = 3600.0


class RouteRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[[router.rules]]`: when every condition given holds, an `auto` task goes to `family`
    (or to the full model id `model`). Bounds are inclusive; `max_tokens` is the requested
    one (before caps). Checked at start by `pipeline.claude.routing.check_router`."""

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


class FamilyLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-minute limits of one (API key, model family); None: learn from the API's headers."""

    rpm: PosInt | None = None
    itpm: PosInt | None = None
    otpm: PosInt | None = None


class ApiKeySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One Anthropic API key. The secret is read from the environment variable `env`, never
    from a file; Redis knows the key by a short hash of it, logs by `name`."""

    name: str
    env: str = "ANTHROPIC_API_KEY"
    # Calls in flight at once with this key, across every worker; 0: no shared limit.
    max_concurrency: Annotated[int, msgspec.Meta(ge=0)] = 0
    # family -> limits for this key, over `ratelimit.limits`.
    limits: dict[str, FamilyLimits] = msgspec.field(default_factory=dict)


class RateLimitSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Rate limits shared by every worker through Redis (the "Rate limits hold" guarantee)."""

    enabled: bool = True
    # Several keys spread the load; each has its own limits. Empty: ANTHROPIC_API_KEY.
    keys: list[ApiKeySettings] = msgspec.field(default_factory=list)
    # family -> limits for every key (a key's own `limits` win). Unset limits are learned
    # from `anthropic-ratelimit-*-limit` headers; until then one call at a time probes.
    limits: dict[str, FamilyLimits] = msgspec.field(default_factory=dict)
    # Shared concurrency slots are leases: a dead worker's slots come back after this.
    slot_lease_ms: PosInt = 30_000
    # How long a probing call (limits not known yet) holds the probe before another may
    # (also how long a dead prober blocks its family: keep it short).
    probe_ms: PosInt = 15_000
    # Longest a waiting call sleeps before asking again (a settle may free room sooner).
    max_poll_ms: PosInt = 1000

    def api_keys(self) -> list[ApiKeySettings]:
        return self.keys or [ApiKeySettings(name="default")]


class ModelPrice(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """List price in USD per million tokens (checked by pricing, which names the model)."""

    input: float
    output: float


def _default_model_prices() -> dict[str, ModelPrice]:
    """Haiku 4.5+, Sonnet 4.5/4.6+, Opus 4.5+ list prices, by family."""
    return {
        "haiku": ModelPrice(input=1.0, output=5.0),
        "sonnet": ModelPrice(input=3.0, output=15.0),
        "opus": ModelPrice(input=5.0, output=25.0),
    }


class PriceTableSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One dated price list, in force from `from` (a UTC day) until the next table's."""

    from_: datetime.date = msgspec.field(name="from")
    # model id or family name -> price; an id not listed is priced by its family.
    models: dict[str, ModelPrice] = msgspec.field(default_factory=_default_model_prices)
    # Multiples of the input price: prompt-cache writes (5-minute and 1-hour TTL), reads.
    cache_write_5m: NonNegFloat = 1.25
    cache_write_1h: NonNegFloat = 2.0
    cache_read: NonNegFloat = 0.1
    # Share of the list price a Batch API call costs (-50%); the pipeline does not batch yet.
    batch: NonNegFloat = 0.5


class PriceSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The dated price tables (`[[prices.tables]]`): a day is priced by the table in force."""

    tables: list[PriceTableSettings] = msgspec.field(
        default_factory=lambda: [PriceTableSettings(from_=datetime.date(2025, 10, 1))]
    )


class LedgerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The cost ledger: tokens and cost per UTC day x model x task type."""

    enabled: bool = True
    # Savings are measured against this family for `model=auto` tasks (an explicit model
    # is its own baseline): "what if everything went to Sonnet". None: router.default_family.
    baseline_family: str | None = None
    ttl_days: PosInt = 400
    # Fields per day's hash; past it, new task types of a model are counted as `other`.
    max_fields: PosInt = 20_000


class BudgetSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Daily spend limits, reserved at worst-case cost before each call. None/empty: off."""

    daily_usd: PosFloat | None = None
    # task type -> its own daily limit (within `daily_usd`, if that is set too).
    types: dict[str, PosFloat] = msgspec.field(default_factory=dict)
    # When a call does not fit: re-route to `downgrade_to` (then defer if that does not fit
    # either), put the task back until the next day, or fail it.
    action: Literal["downgrade", "defer", "fail"] = "defer"
    downgrade_to: str = "haiku"
    # The budget window, aligned to UTC midnight; one day. Tests shorten it.
    period_s: PosInt = 86_400


class BatchSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[batch]`: the Message Batches lane (half price, answers within 24 h).

    A task goes through it when it says `batch=true`, or when its type is in `types` and it
    does not say `batch=false`; either way only if its `deadline` (seconds, when given) is at
    least `worst_case_s`, the longest the lane may take (the API's 24 h plus the wait to
    form a batch). A batch is sent when `max_requests` tasks wait, or when the oldest has
    waited `max_wait_s`; an open batch is polled every `poll_s`, then less often as it ages
    (every twentieth of its age, at most every `poll_max_s`: a batch an hour old is polled
    every 3 minutes, which adds at most 5% to its time to result). A request a batch did not
    answer (a retryable error, expired, canceled) is called on the standard lane, at full
    price, rather than waiting up to a day again."""

    types: list[str] = msgspec.field(default_factory=list)
    max_requests: PosInt = 10_000  # the API takes up to 100,000 (and 256 MB) per batch
    max_wait_s: PosFloat = 60.0
    poll_s: PosFloat = 30.0
    poll_max_s: PosFloat = 300.0  # batch API calls count against rate limits too
    worst_case_s: PosInt = 90_000  # 24 h + forming and polling
    leader_ttl_s: PosFloat = 30.0  # a dead batcher's lane is taken over after this


class Settings(BaseSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything a process needs; built by `load_settings`."""

    claude: ClaudeSettings = msgspec.field(default_factory=ClaudeSettings)
    router: RouterSettings = msgspec.field(default_factory=RouterSettings)
    cache: CacheSettings = msgspec.field(default_factory=CacheSettings)
    ingress: IngressSettings = msgspec.field(default_factory=IngressSettings)
    budget: BudgetSettings = msgspec.field(default_factory=BudgetSettings)
    prices: PriceSettings = msgspec.field(default_factory=PriceSettings)
    ledger: LedgerSettings = msgspec.field(default_factory=LedgerSettings)
    ratelimit: RateLimitSettings = msgspec.field(default_factory=RateLimitSettings)
    batch: BatchSettings = msgspec.field(default_factory=BatchSettings)

    def check(self) -> None:
        super().check()
        families = self.claude.models
        for task_type, ttl in self.cache.ttl_by_type.items():
            if not isinstance(ttl, bool) and ttl < 0:
                where = f"cache.ttl_by_type.{task_type}"
                raise ConfigError(where, f"{ttl} is negative (0: no cache)")
        if self.budget.action == "downgrade" and self.budget.downgrade_to not in families:
            raise ConfigError("budget.downgrade_to", f"not one of {sorted(families)}")
        if self.ledger.baseline_family not in (None, *families):
            raise ConfigError("ledger.baseline_family", f"not one of {sorted(families)}")
        _check_ratelimit(self.ratelimit, families)
        if self.batch.max_requests > 100_000:
            raise ConfigError("batch.max_requests", "at most 100000 (the API's limit per batch)")


def _check_ratelimit(rl: RateLimitSettings, families: Mapping[str, str]) -> None:
    names = [key.name for key in rl.keys]
    for i, key in enumerate(rl.keys):
        where = f"ratelimit.keys[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", key.name) or names.count(key.name) > 1:
            raise ConfigError(f"{where}.name", f"must be unique letters/digits/_-.: {key.name!r}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.env):
            raise ConfigError(f"{where}.env", f"not an environment variable name: {key.env!r}")
        for family in key.limits:
            if family not in families:
                raise ConfigError(f"{where}.limits.{family}", f"not one of {sorted(families)}")
    for family in rl.limits:
        if family not in families:
            raise ConfigError(f"ratelimit.limits.{family}", f"not one of {sorted(families)}")


def check_moved_settings(raw: dict[str, Any]) -> None:
    """Settings replaced by router rules: a clear error rather than "unknown setting"."""
    for name, hint in _MOVED_ROUTER_SETTINGS.items():
        if isinstance(raw.get("router"), dict) and name in raw["router"]:
            raise ConfigError(f"router.{name}", f"replaced by router rules: {hint}")
