"""router: sends each task to its model family's call lane, with its model id and max_tokens.

Cost control: `auto` tasks follow `router.rules` (task type, prompt length, requested
max_tokens; first match wins, else `router.default_family`), explicit models are honoured,
per-type `max_tokens_caps` bind everyone. The decision is made once, by cache-check
(`pipeline.claude.routing.route`, whose result keys the response cache), and arrives with the
request: this stage applies it, so the lane always matches the cache key. One lane per
family, since rate limits are per family.
"""

from __future__ import annotations

from pipeline import Fail, Forward, Handler, Message, Outcome, Services, Settings, Stage
from pipeline.claude import Request, Route, Routed, batched, prompt_chars, route, unknown_model


async def build(services: Services[Settings]) -> Handler:
    """The handler, with this worker's routing settings."""
    settings = services.settings

    async def handle(msg: Message) -> Outcome:
        request = msg.body(Request)
        decision = request.decision
        if not isinstance(decision, Route | None):  # from a release that carried none
            decision = route(request, settings, prompt_chars(request))
        if decision is None:
            return Fail(unknown_model(request.model, settings.claude))
        routed = Routed.applying(request, decision)
        to = "claude-batch" if batched(request, settings) else "claude-call"
        return Forward(to, routed, lane=decision.family)

    return handle


stage = Stage("router", "route", build=build)
