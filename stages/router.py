"""router: sends each task to its model family's call lane, with its model id and max_tokens.

Cost control: `auto` tasks follow `router.rules` (task type, prompt length, requested
max_tokens; first match wins, else `router.default_family`), explicit models are honoured,
per-type `max_tokens_caps` bind everyone. The decision is made once, by cache-check
(`pipeline.claude.routing.route`, whose result keys the response cache), and arrives with the
request: this stage applies it, so the lane always matches the cache key. One lane per
family, since rate limits are per family.
"""

from __future__ import annotations

import logging

from pipeline import Fail, Forward, Handler, Message, Outcome, Services, Settings, Stage
from pipeline.claude import Request, Route, Routed, batched, prompt_chars, route, unknown_model

log = logging.getLogger(__name__)


async def build(services: Services[Settings]) -> Handler:
    """The handler, with this worker's routing settings."""
    settings = services.settings
    # The batch lane keeps per-family state that is not partitioned yet: on a partitioned
    # deployment (a Redis Cluster) tasks that may wait are called on the standard lane.
    batch_lane = not services.keys.partitions
    if not batch_lane:
        log.info("router: partitioned deployment: the batch lane is off, tasks that ask for "
                 "it are called on the standard lane (docs/CLUSTER.md)")  # fmt: skip

    async def handle(msg: Message) -> Outcome:
        request = msg.body(Request)
        decision = request.decision
        if not isinstance(decision, Route | None):  # from a release that carried none
            decision = route(request, settings, prompt_chars(request))
        if decision is None:
            return Fail(unknown_model(request.model, settings.claude))
        routed = Routed.applying(request, decision)
        to = "claude-batch" if batch_lane and batched(request, settings) else "claude-call"
        return Forward(to, routed, lane=decision.family)

    return handle


stage = Stage("router", "route", build=build)
