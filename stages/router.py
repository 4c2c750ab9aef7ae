"""router: picks the model family and model for a task, and caps its max_tokens.

Cost control: `auto` tasks follow the task-type rules (`router.types`) unless the prompt is
long, explicit models are honoured, per-type `max_tokens_caps` apply to everyone. The task
goes on to claude-call on its family's lane, since rate limits are per family.
"""

from __future__ import annotations

import re

from pipeline import Fail, Forward, Handler, Message, Outcome, Services, Settings, Stage
from pipeline.request import prompt_chars
from pipeline.task import Request, Routed

_ID_TOKENS = re.compile(r"[-.:@/_]")


async def build(services: Services) -> Handler:
    """The handler, with this worker's routing settings."""
    settings = services.settings

    async def route(msg: Message) -> Outcome:
        request = msg.body(Request)
        family = _family(request, settings)
        if family is None:
            choices = ", ".join(["auto", *settings.claude.models])
            return Fail(f"unknown model {request.model!r}: use {choices} or a claude-* model id")
        model = settings.claude.models[family] if _is_alias(request, settings) else request.model
        routed = Routed(
            request=request, family=family, model=model, max_tokens=_max_tokens(request, settings)
        )
        return Forward("claude-call", routed, lane=family)

    return route


def _is_alias(request: Request, settings: Settings) -> bool:
    return request.model == "auto" or request.model in settings.claude.models


def _family(request: Request, settings: Settings) -> str | None:
    """The family (call lane) of the task's model choice; None if it names no known family."""
    rules, models = settings.router, settings.claude.models
    if request.model == "auto":
        ruled = rules.types.get(request.type)
        if ruled is not None and prompt_chars(request) <= rules.long_prompt_chars:
            return ruled
        return rules.default_family
    if request.model in models:
        return request.model
    for family, model_id in models.items():  # a configured id first: it may name no family
        if request.model == model_id:
            return family
    tokens = set(_ID_TOKENS.split(request.model.lower()))
    if "claude" not in tokens:
        return None
    return next((family for family in models if family in tokens), None)


def _max_tokens(request: Request, settings: Settings) -> int:
    wanted = request.max_tokens or settings.claude.default_max_tokens
    cap = settings.router.max_tokens_caps.get(request.type)
    return wanted if cap is None else min(wanted, cap)


stage = Stage("router", "route", build=build)
