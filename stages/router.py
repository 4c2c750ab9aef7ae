"""router: sends each task to its model family's call lane, with its model id and max_tokens.

Cost control: `auto` tasks follow `router.rules` (task type, prompt length, requested
max_tokens; first match wins, else `router.default_family`), explicit models are honoured,
per-type `max_tokens_caps` bind everyone. The decision itself is `pipeline.claude.routing.route`,
which cache-check also uses for the cache key. One lane per family, since rate limits are
per family.
"""

from __future__ import annotations

from pipeline import Fail, Forward, Handler, Message, Outcome, Services, Settings, Stage
from pipeline.claude import Request, Routed, prompt_chars, route


async def build(services: Services[Settings]) -> Handler:
    """The handler, with this worker's routing settings."""
    settings = services.settings

    async def handle(msg: Message) -> Outcome:
        request = msg.body(Request)
        decision = route(request, settings, prompt_chars(request))
        if decision is None:
            choices = ", ".join(["auto", *settings.claude.models])
            return Fail(f"unknown model {request.model!r}: use {choices} or a claude-* model id")
        routed = Routed(
            request=request,
            family=decision.family,
            model=decision.model,
            max_tokens=decision.max_tokens,
        )
        return Forward("claude-call", routed, lane=decision.family)

    return handle


stage = Stage("router", "route", build=build)
