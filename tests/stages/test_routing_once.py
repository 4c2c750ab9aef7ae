"""One routing decision per task: cache-check makes it, the router applies it.

The decision keys the response cache (`request_hash`) and picks the call lane; made twice, the
two could disagree (a rule changed between the two stages' processes) and an answer from one
model would be cached under another's key. The budget's downgrade is a second, explicit
decision, made by the same function.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from pipeline import Fail, Forward, Keys, Message, Services, Settings
from pipeline.claude import Request, Reservation, Route, Routed, parse_request
from pipeline.claude import routing as routing_module
from pipeline.client import task_fields
from pipeline.runtime.wire import ENVELOPE_FIELD, decode_entry, encode_body, encode_envelope
from stages import cache_check, router
from tests.stages.test_budget import HAIKU, budget_for
from tests.stages.test_budget import routed as budget_routed

pytestmark = pytest.mark.anyio
FIELDS = {"prompt": "Is this spam?", "type": "classify"}


@pytest.fixture
async def client(redis_url: str, anyio_backend: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url)
    yield redis
    await redis.aclose()


@pytest.fixture
def decisions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Request]]:
    """Every call of `pipeline.claude.routing.route`, wherever a module imported it from."""
    calls: list[Request] = []
    real: Callable[..., Route | None] = routing_module.route

    def counted(request: Request, *args: Any, **kwargs: Any) -> Route | None:
        calls.append(request)
        return real(request, *args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "route", None) is real:
            monkeypatch.setattr(module, "route", counted)
    yield calls


def ingress(fields: dict[str, str]) -> Message:
    entry_id = f"{int(time.time() * 1000)}-0"
    raw = {k.encode(): v.encode() for k, v in fields.items()}
    return Message(decode_entry(entry_id, raw, 1 << 22), entry_id, "cache-check", None, 1)


def handed_on(msg: Message, body: object) -> Message:
    """The router's entry as the runtime writes it: `body` packed into the envelope."""
    env = msgspec.structs.replace(msg.envelope, body=encode_body(body))
    packed = encode_envelope(env)
    return Message(decode_entry(msg.entry_id, {ENVELOPE_FIELD: packed}, 1 << 22), msg.entry_id,
                   "router", None, 1)  # fmt: skip


async def through_router(client: Redis, settings: Settings, msg: Message) -> Forward | Fail:
    handle = await router.build(Services(settings, client, Keys(settings.prefix)))
    outcome = await handle(msg)
    assert isinstance(outcome, Forward | Fail)
    return outcome


async def test_a_task_is_routed_once_through_cache_check_and_router(
    client: Redis, settings: Settings, decisions: list[Request]
) -> None:
    check = await cache_check.build(Services(settings, client, Keys(settings.prefix)))
    msg = ingress(FIELDS)
    first = await check(msg)
    assert isinstance(first, Forward) and first.to == "router"
    outcome = await through_router(client, settings, handed_on(msg, first.body))
    assert isinstance(outcome, Forward) and isinstance(outcome.body, Routed)
    assert len(decisions) == 1, "cache-check decides; the router applies its decision"
    assert (outcome.lane, outcome.body.family) == ("haiku", "haiku")
    # The decision now lives in Routed's fields alone: the request travels on without it.
    assert outcome.body.request.decision is msgspec.UNSET


async def test_the_router_applies_the_carried_decision(
    client: Redis, settings: Settings, decisions: list[Request]
) -> None:
    """The router sends the task where cache-check's decision (the one its cache key stands
    for) says, even where its own rules would say otherwise."""
    carried = Route(family="opus", model="claude-opus-5-5", max_tokens=77)
    request = msgspec.structs.replace(parse_request(FIELDS, settings), decision=carried)
    decisions.clear()
    outcome = await through_router(client, settings, handed_on(ingress(FIELDS), request))
    assert isinstance(outcome, Forward) and isinstance(outcome.body, Routed)
    assert (outcome.lane, outcome.body.model, outcome.body.max_tokens) == (
        "opus",
        "claude-opus-5-5",
        77,
    )
    assert decisions == []


async def test_an_unknown_model_is_decided_once_and_failed_by_the_router(
    client: Redis, settings: Settings, decisions: list[Request]
) -> None:
    check = await cache_check.build(Services(settings, client, Keys(settings.prefix)))
    msg = ingress({"prompt": "q", "model": "gpt-4o"})
    first = await check(msg)
    assert isinstance(first, Forward) and first.to == "router"
    outcome = await through_router(client, settings, handed_on(msg, first.body))
    assert isinstance(outcome, Fail) and outcome.reason.startswith("unknown model 'gpt-4o'")
    assert len(decisions) == 1


async def test_an_entry_without_a_decision_is_routed_by_the_router(
    client: Redis, settings: Settings, decisions: list[Request]
) -> None:
    """An entry from a cache-check of a release that carried no decision (a rolling upgrade)
    still decodes, and the router decides for it as it always did."""
    undecided = msgspec.structs.replace(parse_request(FIELDS, settings), decision=msgspec.UNSET)
    assert b"decision" not in msgspec.msgpack.encode(undecided), "encoded as before"
    decisions.clear()
    outcome = await through_router(client, settings, handed_on(ingress(FIELDS), undecided))
    assert isinstance(outcome, Forward) and isinstance(outcome.body, Routed)
    assert (outcome.lane, outcome.body.model) == ("haiku", settings.claude.models["haiku"])
    assert len(decisions) == 1


def test_the_client_validates_without_routing(settings: Settings, decisions: list[Request]) -> None:
    """Checking a task before XADD decides nothing: routing is cache-check's."""
    task_fields({"prompt": "q", "model": "haiku", "type": "classify"}, settings)
    assert decisions == []


async def test_the_budget_downgrade_re_routes_with_the_same_function(
    aredis: Redis, settings: Settings, decisions: list[Request]
) -> None:
    """The downgrade is a second decision, explicit, made by `route` (not a copy of its
    rules): as if the task had named the cheaper family itself."""
    # Room for one Haiku reservation (327 micro-USD) but not a Sonnet one (981).
    budget = budget_for(settings, aredis, daily_usd=0.0005, action="downgrade",
                        downgrade_to="haiku")  # fmt: skip
    granted = await budget.reserve(budget_routed())
    assert isinstance(granted, Reservation)
    assert (granted.routed.family, granted.routed.model) == ("haiku", HAIKU)
    assert granted.routed.max_tokens == 64, "the answer's length stays as decided"
    assert granted.routed.request.cache is False
    assert [r.model for r in decisions] == ["haiku"]
