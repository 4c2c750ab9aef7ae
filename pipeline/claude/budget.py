"""Budgets: daily spend limits enforced before the call, not after it (DESIGN "Cost control").

Each call first reserves its worst-case cost (the estimated input plus `max_tokens` of output,
at the model's price) in one script that refuses when committed + worst > budget, so workers
reserving at once can never overshoot together; the real cost replaces the reservation after
the call, and a failed call gives it back. Committed = settled costs + reservations in flight.

A window is a UTC day (`budget.period_s` may shorten it for tests); its hash expires after two
windows. A worker that dies mid-call leaves its reservation committed until the window ends:
the budget errs on the side of spending less. Where a call does not fit, `budget.action`
decides: `downgrade` re-routes it to the cheaper family (`pipeline.claude.routing.route_to`,
the router's own rules; defers if that does not fit either), `defer` puts the task back
until the next window without spending a retry attempt, `fail` fails it with the numbers.
"""

from __future__ import annotations

import datetime
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from redis.asyncio import Redis
from redis.typing import EncodableT

from pipeline.claude.pricing import PriceTable
from pipeline.claude.routing import route_to
from pipeline.claude.scripts import load
from pipeline.claude.settings import Settings
from pipeline.claude.task import Answer, Routed, Usage
from pipeline.claude.tokens import estimate_input_tokens
from pipeline.runtime.keys import Keys
from pipeline.runtime.outcome import Defer, Fail
from pipeline.runtime.redis_conn import Availability
from pipeline.runtime.replies import as_int, as_list, as_str

#: Deferred tasks come back spread over this much of the next window's start, at most.
SPREAD_MAX_S = 60.0


@dataclass(frozen=True, slots=True)
class Reservation:
    """Leave to call `routed` (the task's own routing, or its downgrade)."""

    routed: Routed
    window: str = ""  # "" when no budget applies: nothing was reserved
    micro_usd: int = 0


@dataclass(frozen=True, slots=True)
class _Refusal:
    scope: str  # "all" or "type"
    limit: int  # micro-USD
    committed: int
    spent: int
    worst: int


class Budget:
    """The budgets of one worker process's claude-call handlers."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        keys: Keys,
        available: Availability,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._budget = settings.budget
        self._prices = PriceTable.from_settings(settings)
        self._keys = keys
        self._available = available
        self._clock = clock
        self._reserve = load(redis, "budget_reserve")
        self._settle = load(redis, "budget_settle")

    def applies_to(self, task_type: str) -> bool:
        """False when no budget covers the type (then nothing touches Redis)."""
        return self._budget.daily_usd is not None or task_type in self._budget.types

    async def reserve(self, routed: Routed, *, batch: bool = False) -> Reservation | Defer | Fail:
        """Reserve the worst-case cost of calling `routed` (through the batch lane, at its
        rates: `batch`), or what to do instead."""
        if not self.applies_to(routed.request.type):
            return Reservation(routed)
        now = self._clock()
        got = await self._try(routed, now, batch)
        if isinstance(got, Reservation):
            return got
        refusal, note = got, ""
        if self._budget.action == "downgrade" and (cheaper := self._downgraded(routed)):
            got = await self._try(cheaper, now, batch)
            if isinstance(got, Reservation):
                return got
            refusal, note = got, f" (on {self._budget.downgrade_to} too)"
        reason = self._explain(refusal, routed.request.type) + note
        if self._budget.action == "fail":
            return Fail(f"{reason}; the task fails (budget.action = fail)")
        start = self._window_start(now) + self._budget.period_s
        spread = random.uniform(0, min(SPREAD_MAX_S, self._budget.period_s / 10))
        until = datetime.datetime.fromtimestamp(start, datetime.UTC)
        return Defer(
            f"{reason}; deferred until {until:%Y-%m-%d %H:%M:%S} UTC",
            delay_ms=int((start - now + spread) * 1000),
        )

    async def settle(self, reservation: Reservation, answer: Answer) -> None:
        """Replace the reservation by what the call really cost."""
        if reservation.window:
            day = _day(reservation.window)
            usage = answer.usage
            cost = self._prices.cost_micro_usd(answer.model, usage, day, batch=usage.batch)
            await self._put_back(reservation, cost)

    async def release(self, reservation: Reservation) -> None:
        """Give the reservation back: the call failed, so it cost nothing."""
        if reservation.window:
            await self._put_back(reservation, 0)

    # ---- Redis -------------------------------------------------------------------------

    async def _try(self, routed: Routed, now: float, batch: bool) -> Reservation | _Refusal:
        window = self._window(now)
        worst = self.worst_case_micro_usd(routed, _day(window), batch=batch)
        task_type = routed.request.type
        type_limit = self._budget.types.get(task_type)
        daily = _micro_arg(self._budget.daily_usd)
        args: list[EncodableT] = [
            worst,
            daily,
            task_type,
            _micro_arg(type_limit),
            2 * self._budget.period_s,
        ]
        key = self._keys.budget(window)
        reply = as_list(await self._available.call(lambda: self._reserve(keys=[key], args=args)))
        if as_int(reply[0]) == 1:
            return Reservation(routed, window, worst)
        scope = as_str(reply[1])
        limit = _micro(self._budget.daily_usd if scope == "all" else type_limit)
        return _Refusal(scope, limit, as_int(reply[2]), as_int(reply[3]), worst)

    async def _put_back(self, reservation: Reservation, cost: int) -> None:
        key = self._keys.budget(reservation.window)
        args: list[EncodableT] = [reservation.routed.request.type, reservation.micro_usd, cost]
        await self._available.call(lambda: self._settle(keys=[key], args=args))

    # ---- arithmetic --------------------------------------------------------------------

    def worst_case_micro_usd(
        self, routed: Routed, day: datetime.date | None = None, *, batch: bool = False
    ) -> int:
        """The most calling `routed` can cost: estimated input, and all of `max_tokens` out
        (at batch rates: `batch`)."""
        usage = Usage(
            input_tokens=estimate_input_tokens(routed.request), output_tokens=routed.max_tokens
        )
        return self._prices.cost_micro_usd(routed.model, usage, day, batch=batch)

    def _downgraded(self, routed: Routed) -> Routed | None:
        """`routed` re-routed to `budget.downgrade_to`, None if it is already going there.

        Only the family and model change: `max_tokens` stays as first decided (the caps go
        by task type, not family), so the downgrade never asks for a longer answer."""
        cheaper = route_to(routed.request, self._budget.downgrade_to, self._settings)
        if routed.family == cheaper.family or routed.model == cheaper.model:
            return None
        # The answer is not what the request's cache key stands for: never cache it.
        request = msgspec.structs.replace(routed.request, cache=False)
        return msgspec.structs.replace(
            routed, request=request, family=cheaper.family, model=cheaper.model
        )

    def _window_start(self, now: float) -> int:
        return int(now) - int(now) % self._budget.period_s

    def _window(self, now: float) -> str:
        """The window's name: its UTC date (and time, for windows shorter than a day)."""
        start = datetime.datetime.fromtimestamp(self._window_start(now), datetime.UTC)
        whole_days = self._budget.period_s % 86_400 == 0
        return start.strftime("%Y-%m-%d" if whole_days else "%Y-%m-%dT%H:%M:%S")

    def _explain(self, refusal: _Refusal, task_type: str) -> str:
        which = "daily budget" if refusal.scope == "all" else f"daily budget of type {task_type!r}"
        in_flight = refusal.committed - refusal.spent
        return (
            f"{which} {_usd(refusal.limit)} reached (spent {_usd(refusal.spent)}"
            + (f", {_usd(in_flight)} reserved by calls in flight" if in_flight > 0 else "")
            + f"; this call may cost up to {_usd(refusal.worst)})"
        )


def _day(window: str) -> datetime.date:
    return datetime.date.fromisoformat(window[:10])


def _micro(usd: float | None) -> int:
    return round((usd or 0) * 1_000_000)


def _micro_arg(usd: float | None) -> int | str:
    """A limit as the script takes it: micro-USD, or '' for none."""
    return "" if usd is None else _micro(usd)


def _usd(micro: int) -> str:
    """Dollars for people: cents, or more digits for amounts under a cent."""
    return f"${micro / 1_000_000:,.2f}" if micro >= 10_000 else f"${micro / 1_000_000:.6f}"
