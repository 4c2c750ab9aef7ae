"""The routing decision: which family, model id and max_tokens a request is sent with.

One pure function of the request and the settings, called once per task by cache-check
(`pipeline.claude.request.parse_request`: the response cache is keyed by the decision, so a
rule change re-keys exactly the requests it re-routes); the decision travels to the router
inside the request (`Request.decision`), which applies it. `auto` tasks follow `router.rules`
in order, first match wins, else `router.default_family`; an explicit alias or model id is
honoured; per-type `max_tokens_caps` bind every task. The budget's downgrade is a second,
explicit decision by the same function (`route_to`). See docs/ROUTING.md.

Which family (call lane) a model id belongs to is decided by `family_of` alone: routing,
the router's refusal, start-up checks and pricing all ask it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping

import msgspec

from pipeline.claude.settings import ClaudeSettings, RouterSettings, RouteRule, Settings
from pipeline.claude.task import Request, Route
from pipeline.runtime.errors import ConfigError

__all__ = [
    "Route",
    "batched",
    "check_families",
    "check_router",
    "family_of",
    "matches",
    "route",
    "route_to",
    "unknown_model",
]

_ID_TOKENS = re.compile(r"[-.:@/_]")
#: A family names a stream (`<prefix>:call:<family>`), a metric label and, in deploy/, a
#: Deployment (`claude-call-<family>`): a DNS label.
_FAMILY_NAME = re.compile(r"[a-z](?:[a-z0-9-]{0,30}[a-z0-9])?")
#: The families a config without `[claude.models]` has.
_DEFAULT_FAMILIES = tuple(ClaudeSettings().models)
_RANGES = (("min_prompt_chars", "max_prompt_chars"), ("min_max_tokens", "max_max_tokens"))


def route(request: Request, settings: Settings, prompt_chars: int) -> Route | None:
    """The decision for `request`; None when its model choice names no configured family.

    `prompt_chars` is `pipeline.claude.request.prompt_chars(request)` (passed in: that module
    hashes the decision, so it cannot be imported here).
    """
    models, router = settings.claude.models, settings.router
    wanted = request.max_tokens or settings.claude.default_max_tokens
    choice = request.model
    if choice == "auto":
        choice = _first_match(router, request.type, prompt_chars, wanted)
    family = family_of(choice, settings.claude)
    if family is None:
        return None
    cap = router.max_tokens_caps.get(request.type)
    return Route(
        family=family,
        model=models[family] if choice in models else choice,
        max_tokens=wanted if cap is None else min(wanted, cap),
    )


def batched(request: Request, settings: Settings) -> bool:
    """Whether `request` goes through the batch lane: asked for (`batch=true`), or of a type
    `batch.types` names and not refused (`batch=false`); and never when its `deadline` is
    shorter than the lane's worst case (`batch.worst_case_s`)."""
    policy = settings.batch
    wanted = request.type in policy.types if request.batch is None else request.batch
    return wanted and (request.deadline_s is None or request.deadline_s >= policy.worst_case_s)


def route_to(request: Request, family: str, settings: Settings) -> Route:
    """The decision for `request` had it named `family` itself: a re-route (the budget's
    downgrade) by `route`, not by a copy of its rules. Prompt length plays no part in an
    explicit choice, so none is measured.

    Raises:
        ValueError: `family` is not configured (settings checks `budget.downgrade_to` at start).
    """
    decision = route(msgspec.structs.replace(request, model=family), settings, prompt_chars=0)
    if decision is None:
        raise ValueError(f"{family!r} is not a configured model family")
    return decision


def family_of(model: str, claude: ClaudeSettings) -> str | None:
    """The family (call lane) of a model choice; None when nothing maps it. First that holds:

    1. an alias: a family name of `claude.models` (`opus`);
    2. a configured model id (`claude.models`), exactly: it may name no family at all;
    3. the first `[[claude.families]]` rule with a glob matching the lower-cased id
       (`claude-mythos-*` -> opus);
    4. the built-in rule: an id with a `claude` token and a configured family's name as
       another token, tokens split at `- . : @ / _` (`claude-3-5-haiku-20241022`,
       `anthropic.claude-3-haiku-20240307-v1:0`, `claude-fable-5` once `fable` is configured).
    """
    models = claude.models
    if model in models:
        return model
    for family, model_id in models.items():
        if model == model_id:
            return family
    lowered = model.lower()
    for rule in claude.families:
        if any(fnmatch.fnmatchcase(lowered, glob) for glob in rule.match):
            return rule.family
    tokens = set(_ID_TOKENS.split(lowered))
    if "claude" not in tokens:
        return None
    return next((family for family in models if family in tokens), None)


def unknown_model(model: str, claude: ClaudeSettings) -> str:
    """The one-line refusal of a model choice `family_of` maps to no family."""
    globs = [glob for rule in claude.families for glob in rule.match]
    ruled = f", an id matching claude.families ({', '.join(globs)})" if globs else ""
    return (
        f"unknown model {model!r}: use auto, {', '.join(claude.models)}, a claude id naming "
        f"one of those families (claude-<family>-...){ruled}, or add the family to "
        "[claude.models] (docs/ROUTING.md)"
    )


def matches(rule: RouteRule, task_type: str, prompt_chars: int, max_tokens: int) -> bool:
    """Every condition the rule gives holds (bounds are inclusive)."""
    return (
        (not rule.types or task_type in rule.types)
        and _within(prompt_chars, rule.min_prompt_chars, rule.max_prompt_chars)
        and _within(max_tokens, rule.min_max_tokens, rule.max_max_tokens)
    )


def check_families(claude: ClaudeSettings) -> None:
    """Start-up validation of the families (`claude.models`) and `[[claude.families]]`.

    Raises:
        ConfigError: e.g. `claude.families[0].family: 'mythos' not one of haiku, opus,
            sonnet (a family is added in [claude.models])`.
    """
    models = claude.models
    if not models:
        raise ConfigError("claude.models", "needs at least one family (family = model id)")
    for family, model_id in models.items():
        where = f"claude.models.{family}"
        if family == "auto" or not _FAMILY_NAME.fullmatch(family):
            raise ConfigError(
                where,
                f"{family!r} cannot name a family: lower-case letters, digits and '-', at most "
                "32 characters, not 'auto' (it names the lane's stream and Deployment)",
            )
        if not model_id or model_id != model_id.strip() or " " in model_id:
            raise ConfigError(where, f"{model_id!r} is no model id")
    for i, rule in enumerate(claude.families):
        where = f"claude.families[{i}]"
        if rule.family not in models:
            raise ConfigError(f"{where}.family", _not_a_family(rule.family, models))
        if not rule.match:
            raise ConfigError(f"{where}.match", "give at least one glob, e.g. 'claude-mythos-*'")
        for j, glob in enumerate(rule.match):
            at = f"{where}.match[{j}]"
            if not glob or glob != glob.strip() or " " in glob:
                raise ConfigError(at, f"{glob!r} is no model id glob")
            if glob != glob.lower():
                raise ConfigError(at, f"{glob!r}: ids are matched lower-cased; write it so")
            if not glob.strip("*"):
                raise ConfigError(
                    at, f"{glob!r} matches every model id: no unknown model would be refused"
                )


def check_router(settings: Settings) -> None:
    """Start-up validation of the families (`check_families`) and `[router]`, naming the
    offending field.

    Raises:
        ConfigError: e.g. `router.rules[2].family: 'gpt' not one of haiku, opus, sonnet`.
    """
    check_families(settings.claude)
    models, router = settings.claude.models, settings.router
    families = ", ".join(sorted(models))
    if router.default_family not in models:
        raise ConfigError("router.default_family", _not_a_family(router.default_family, models))
    for i, rule in enumerate(router.rules):
        where = f"router.rules[{i}]"
        if not rule.types and _unbounded(rule):
            raise ConfigError(
                where,
                "matches every task: give types, min/max_prompt_chars or min/max_max_tokens "
                "(router.default_family already takes what no rule matches)",
            )
        for j, task_type in enumerate(rule.types):
            if not task_type or task_type != task_type.strip().lower():
                raise ConfigError(
                    f"{where}.types[{j}]", f"{task_type!r}: task types are lower-case labels"
                )
        for low, high in _RANGES:
            lo, hi = getattr(rule, low), getattr(rule, high)
            if lo is not None and hi is not None and lo > hi:
                raise ConfigError(f"{where}.{low}", f"{lo} is greater than {high} ({hi})")
        if (rule.family is None) == (rule.model is None):
            raise ConfigError(where, "give exactly one of family or model (where matches go)")
        if rule.family is not None and rule.family not in models:
            raise ConfigError(f"{where}.family", _not_a_family(rule.family, models))
        if rule.model is not None and family_of(rule.model, settings.claude) is None:
            raise ConfigError(
                f"{where}.model",
                f"{rule.model!r} is no configured model id (claude.models), matches no "
                f"claude.families rule and is no claude-* id naming one of {families}",
            )


def _not_a_family(name: str, models: Mapping[str, str]) -> str:
    """Why `name` is refused as a family, and how to make it one."""
    text = f"{name!r} not one of {', '.join(sorted(models))}"
    if name in _DEFAULT_FAMILIES:  # a [claude.models] table in the file left it out
        defaults = ", ".join(_DEFAULT_FAMILIES)
        return (
            f"{text} ([claude.models] replaces the default families {defaults}: list each "
            "one you keep)"
        )
    return f"{text} (a family is added in [claude.models])"


def _first_match(router: RouterSettings, task_type: str, prompt_chars: int, max_tokens: int) -> str:
    for rule in router.rules:
        if matches(rule, task_type, prompt_chars, max_tokens):
            return rule.family or rule.model or router.default_family
    return router.default_family


def _within(value: int, low: int | None, high: int | None) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


def _unbounded(rule: RouteRule) -> bool:
    return all(getattr(rule, bound) is None for pair in _RANGES for bound in pair)
