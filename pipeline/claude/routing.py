"""The routing decision: which family, model id and max_tokens a request is sent with.

One pure function of the request and the settings, called once per task by cache-check
(`pipeline.claude.request.parse_request`: the response cache is keyed by the decision, so a
rule change re-keys exactly the requests it re-routes); the decision travels to the router
inside the request (`Request.decision`), which applies it. `auto` tasks follow `router.rules`
in order, first match wins, else `router.default_family`; an explicit alias or model id is
honoured; per-type `max_tokens_caps` bind every task. The budget's downgrade is a second,
explicit decision by the same function (`route_to`). See docs/ROUTING.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import msgspec

from pipeline.claude.settings import RouterSettings, RouteRule, Settings
from pipeline.claude.task import Request, Route
from pipeline.runtime.errors import ConfigError

__all__ = ["Route", "check_router", "family_of", "matches", "route", "route_to"]

_ID_TOKENS = re.compile(r"[-.:@/_]")
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
    family = family_of(choice, models)
    if family is None:
        return None
    cap = router.max_tokens_caps.get(request.type)
    return Route(
        family=family,
        model=models[family] if choice in models else choice,
        max_tokens=wanted if cap is None else min(wanted, cap),
    )


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


def family_of(model: str, models: Mapping[str, str]) -> str | None:
    """The family of an alias, a configured model id, or a `claude-*` id naming a family."""
    if model in models:
        return model
    for family, model_id in models.items():  # a configured id first: it may name no family
        if model == model_id:
            return family
    tokens = set(_ID_TOKENS.split(model.lower()))
    if "claude" not in tokens:
        return None
    return next((family for family in models if family in tokens), None)


def matches(rule: RouteRule, task_type: str, prompt_chars: int, max_tokens: int) -> bool:
    """Every condition the rule gives holds (bounds are inclusive)."""
    return (
        (not rule.types or task_type in rule.types)
        and _within(prompt_chars, rule.min_prompt_chars, rule.max_prompt_chars)
        and _within(max_tokens, rule.min_max_tokens, rule.max_max_tokens)
    )


def check_router(settings: Settings) -> None:
    """Start-up validation of `[router]`, naming the offending field.

    Raises:
        ConfigError: e.g. `router.rules[2].family: 'gpt' not one of haiku, opus, sonnet`.
    """
    models, router = settings.claude.models, settings.router
    families = ", ".join(sorted(models))
    if router.default_family not in models:
        raise ConfigError(
            "router.default_family", f"{router.default_family!r} not one of {families}"
        )
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
            raise ConfigError(f"{where}.family", f"{rule.family!r} not one of {families}")
        if rule.model is not None and family_of(rule.model, models) is None:
            raise ConfigError(
                f"{where}.model",
                f"{rule.model!r} is no configured model id (claude.models) and no claude-* id "
                f"naming one of {families}",
            )


def _first_match(router: RouterSettings, task_type: str, prompt_chars: int, max_tokens: int) -> str:
    for rule in router.rules:
        if matches(rule, task_type, prompt_chars, max_tokens):
            return rule.family or rule.model or router.default_family
    return router.default_family


def _within(value: int, low: int | None, high: int | None) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


def _unbounded(rule: RouteRule) -> bool:
    return all(getattr(rule, bound) is None for pair in _RANGES for bound in pair)
