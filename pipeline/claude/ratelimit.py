"""Rate limits that hold across every worker (the "Rate limits hold" guarantee), kept in Redis.

Per (API key, model family): requests, input tokens and output tokens per minute, as the
continuously refilled buckets Anthropic uses. A call reserves 1 request, its estimated input
and its whole `max_tokens` before it starts, and settles to the real usage after (refunding
what it did not use). One script call admits or refuses, weighing every API key at once, so
load spreads over keys. Limits come from config or are learned from the API's
`anthropic-ratelimit-*` headers, whose `remaining` also corrects drift when another client
spends the same key; a 429 sets a cool-down every worker obeys. Each admitted call holds a
concurrency slot: a lease this process renews, which a dead worker's slots outlive only by
`slot_lease_ms`.

Waiting is per family and per process: the first waiter asks Redis and sleeps exactly as
long as the script says the room takes to refill; the others queue behind it in order, so
a long wait for Opus never delays a Haiku call and Redis sees one poll per family, not
one per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from pipeline.claude.scripts import load
from pipeline.claude.settings import ApiKeySettings, FamilyLimits, RateLimitSettings
from pipeline.runtime.calls import TokenUsage
from pipeline.runtime.keys import Keys
from pipeline.runtime.redis_conn import Availability

log = logging.getLogger(__name__)

Arg = str | int | float  # a script argument
_KINDS = ("requests", "input-tokens", "output-tokens")


def key_id(secret: str | None) -> str:
    """How Redis names an API key: a short hash, the same for every worker using it."""
    return hashlib.sha256((secret or "").encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One configured key: its settings, its secret (from the environment) and its id."""

    settings: ApiKeySettings
    secret: str | None

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def id(self) -> str:
        return key_id(self.secret)


@dataclass(slots=True)
class Ticket:
    """An admitted call: what it reserved, where, and the slot it holds until settled."""

    key: ApiKey
    family: str
    token: str
    input_tokens: int
    output_tokens: int
    probing: bool


class RateLimiter:
    """One per worker process, shared by every claude-call lane in it."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        settings: RateLimitSettings,
        api_keys: Sequence[ApiKey],
        available: Availability,
    ) -> None:
        if not api_keys:
            raise ValueError("at least one API key")
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._api_keys = tuple(api_keys)
        self._available = available
        self._script = load(redis, "ratelimit")
        self._gates: dict[str, asyncio.Lock] = {}
        self._held: dict[str, set[str]] = {}  # slots key -> tokens of live calls
        self._next = 0
        self._renewer: asyncio.Task[None] | None = None

    def limits(self, key: ApiKey, family: str) -> FamilyLimits:
        return configured_limits(self._settings, key.settings, family)

    async def acquire(self, family: str, input_tokens: int, max_tokens: int) -> Ticket:
        """Wait until some API key has room for this call, reserve it, return the ticket."""
        self._start_renewer()
        gate = self._gates.setdefault(family, asyncio.Lock())
        token = secrets.token_hex(8)
        args: list[Arg] = ["admit", len(self._api_keys), input_tokens, max_tokens, token]
        args += [self._settings.slot_lease_ms, self._settings.probe_ms]
        keys: list[str] = []
        per_key: list[Arg] = []
        for api_key in self._api_keys:
            keys += [self._keys.ratelimit(api_key.id, family), self._keys.slots(api_key.id)]
            limits = self.limits(api_key, family)
            per_key += [limits.rpm or 0, limits.itpm or 0, limits.otpm or 0]
            per_key.append(api_key.settings.max_concurrency)
        keys.append(self._keys.ratelimit_index)
        async with gate:
            while True:
                call_args = [*args, self._next, *per_key]
                reply = await self._available.call(
                    lambda a=call_args: self._script(keys=keys, args=a)  # type: ignore[misc]
                )
                if int(reply[0]) == 1:
                    self._next = (self._next + 1) % len(self._api_keys)
                    api_key = self._api_keys[int(reply[1]) - 1]
                    self._hold(api_key, token)
                    return Ticket(
                        key=api_key,
                        family=family,
                        token=token,
                        input_tokens=input_tokens,
                        output_tokens=max_tokens,
                        probing=bool(int(reply[2])),
                    )
                wait_ms = min(max(int(reply[1]), 1), self._settings.max_poll_ms)
                await asyncio.sleep(wait_ms / 1000)

    async def settle(
        self,
        ticket: Ticket,
        *,
        usage: TokenUsage | None,
        status: int,
        headers: Mapping[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        """Give back what the call did not use and free its slot.

        Args:
            usage: the call's real usage; None when it failed (nothing is charged then).
            status: the HTTP status (0: no answer); 200 and 429 carry trustworthy headers.
            retry_after_s: with a 429, how long every worker must leave this family alone.
        """
        used_in = used_out = 0
        if usage is not None:
            # Input-tokens-per-minute counts what the model read fresh: cache reads are free.
            used_in = usage.input_tokens + usage.cache_creation_input_tokens
            used_out = usage.output_tokens
        cool_ms = 0
        if status == 429:
            cool_ms = max(1000, int((retry_after_s or 1.0) * 1000))
        limits = self.limits(ticket.key, ticket.family)
        head_limits, head_remaining = _header_state(headers)
        api_key = ticket.key
        keys = [self._keys.ratelimit(api_key.id, ticket.family), self._keys.slots(api_key.id)]
        args: list[Arg] = ["settle", ticket.token, ticket.input_tokens, ticket.output_tokens]
        args += [used_in, used_out, status, cool_ms]
        args += [limits.rpm or 0, limits.itpm or 0, limits.otpm or 0]
        args += [*head_limits, *head_remaining, "1" if ticket.probing else "0"]
        try:
            await self._available.call(lambda: self._script(keys=keys, args=args))
        finally:
            self._release(api_key, ticket.token)
        if status == 429:
            log.warning(
                "claude 429 on key %s, %s: every worker pauses the family for %.1fs",
                api_key.name,
                ticket.family,
                cool_ms / 1000,
            )

    # ---- concurrency slots ---------------------------------------------------------------

    def _hold(self, api_key: ApiKey, token: str) -> None:
        self._held.setdefault(self._keys.slots(api_key.id), set()).add(token)

    def _release(self, api_key: ApiKey, token: str) -> None:
        self._held.get(self._keys.slots(api_key.id), set()).discard(token)

    def _start_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())

    async def _renew_loop(self) -> None:
        every_s = self._settings.slot_lease_ms / 3000
        while True:
            await asyncio.sleep(every_s)
            for slots_key, tokens in list(self._held.items()):
                if not tokens:
                    continue
                args: list[Arg] = ["renew", self._settings.slot_lease_ms, *tokens]
                try:
                    await self._renew(slots_key, args)
                except Exception:
                    log.exception("renewing rate-limit slots failed (retried)")

    async def _renew(self, slots_key: str, args: list[Arg]) -> None:
        await self._available.call(lambda: self._script(keys=[slots_key], args=args))

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer


def configured_limits(
    settings: RateLimitSettings, key: ApiKeySettings | None, family: str
) -> FamilyLimits:
    """One pair's limits from config: the key's own, else `ratelimit.limits` (None fields are
    learned from the API)."""
    own = key.limits.get(family) if key is not None else None
    shared = settings.limits.get(family)

    def first(name: str) -> int | None:
        for limits in (own, shared):
            value = getattr(limits, name) if limits is not None else None
            if value is not None:
                return int(value)
        return None

    return FamilyLimits(rpm=first("rpm"), itpm=first("itpm"), otpm=first("otpm"))


def _header_state(headers: Mapping[str, str] | None) -> tuple[list[str], list[str]]:
    """(limits, remaining) for requests, input and output tokens; '' where absent."""
    limits: list[str] = []
    remaining: list[str] = []
    for kind in _KINDS:
        for out, what in ((limits, "limit"), (remaining, "remaining")):
            value = headers.get(f"anthropic-ratelimit-{kind}-{what}") if headers else None
            out.append(value if value is not None and value.isdigit() else "")
    return limits, remaining


@dataclass(frozen=True, slots=True)
class LimitState:
    """One (API key, model family) as `pipeline status` shows it."""

    key_id: str
    family: str
    rpm: int | None  # None: not known (not configured, not learned) or unlimited
    itpm: int | None
    otpm: int | None
    learned: bool
    requests_left: float | None
    input_left: float | None
    output_left: float | None
    cool_down_s: float  # 0 when calls may go
    in_flight: int  # live concurrency slots of the key
    admitted: int
    throttled_429: int
    reserved_input: int
    reserved_output: int
    refunded_input: int
    refunded_output: int


async def limiter_state(
    redis: Redis, keys: Keys, configured: RateLimitSettings | None = None
) -> list[LimitState]:
    """Every (key, family) pair the limiter has seen, levels refilled to Redis's now.

    `configured` supplies limits that live only in config (not learned, so not in Redis);
    without it only learned limits show.
    """
    seconds, micros = await redis.time()
    now = int(seconds) * 1000 + int(micros) // 1000
    names = sorted(_text(k) for k in await redis.smembers(keys.ratelimit_index))
    states = []
    for name in names:
        key_id, family = name.rsplit(":", 2)[-2:]
        h = {_text(k): _text(v) for k, v in (await redis.hgetall(name)).items()}
        own = _configured(configured, key_id, family)
        last = int(float(h.get("t", now)))
        values = []
        for dim, learned_field, limit in zip(("r", "i", "o"), ("lr", "li", "lo"), own, strict=True):
            limit = limit or _int_or_none(h.get(learned_field))
            level = float(h.get(dim, limit or 0)) if limit else None
            if limit and level is not None:
                level = min(limit, level + (now - last) * limit / 60000)
            values.append((limit, level))
        slots = await redis.zcount(keys.slots(key_id), now, "+inf")
        states.append(
            LimitState(
                key_id=key_id,
                family=family,
                rpm=values[0][0],
                itpm=values[1][0],
                otpm=values[2][0],
                learned=h.get("learned") == "1",
                requests_left=values[0][1],
                input_left=values[1][1],
                output_left=values[2][1],
                cool_down_s=max(0.0, (int(float(h.get("cool", 0))) - now) / 1000),
                in_flight=int(slots),
                admitted=int(h.get("admitted", 0)),
                throttled_429=int(h.get("n429", 0)),
                reserved_input=int(h.get("res_i", 0)),
                reserved_output=int(h.get("res_o", 0)),
                refunded_input=int(h.get("ref_i", 0)),
                refunded_output=int(h.get("ref_o", 0)),
            )
        )
    return states


def _configured(
    configured: RateLimitSettings | None, key_id_: str, family: str
) -> tuple[int | None, int | None, int | None]:
    if configured is None:
        return (None, None, None)
    keys = [k for k in configured.api_keys() if key_id(os.environ.get(k.env)) == key_id_]
    limits = configured_limits(configured, keys[0] if keys else None, family)
    return (limits.rpm, limits.itpm, limits.otpm)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _int_or_none(value: str | None) -> int | None:
    return int(float(value)) if value else None
