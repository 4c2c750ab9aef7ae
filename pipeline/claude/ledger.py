"""The cost ledger: tokens and cost per UTC day x model x task type.

Two things are counted, each exactly once. Every **paid call** is counted as its answer is
recorded (`pipeline.claude.task_record`, in the same script), by the call's own record: a call whose
answer was not used (a stalled worker's late duplicate) was billed all the same. Every
**task** is counted once by the store stage (hits, what they saved, the baseline), guarded by
a mark in the task's record, which lives exactly as long as the task's result and recorded
answer, so a redelivered store entry is never counted twice and a reused id after expiry is
a new task. Costs are kept in pico-dollars, a whole number per token (`pipeline.claude.pricing`),
so the ledger's cost is exactly its tokens x price.

Layout: one hash per day, `<prefix>:ledger:<YYYY-MM-DD>`, with fields
`<model>|<type>|<metric>` (the `METRICS` below) and per-minute buckets `@HHMM|tasks` and
`@HHMM|cost_pico` for the current-rate projection.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import msgspec
from redis.asyncio import Redis
from redis.typing import EncodableT

from pipeline.claude.pricing import PriceTable
from pipeline.claude.scripts import load
from pipeline.claude.settings import Settings
from pipeline.claude.task import Answer, Request
from pipeline.runtime.keys import Keys
from pipeline.runtime.redis_conn import Availability
from pipeline.runtime.services import Services

log = logging.getLogger(__name__)


class Totals(msgspec.Struct, kw_only=True):
    """Counters of one group (or a sum of groups). Costs in pico-dollars.

    `requests`, the token counts and `cost_pico` are paid calls; `hits` are answers served
    without a call of their own (response cache or coalesced) and `saved_pico` what they
    would have cost at their model; `baseline_pico` is what every answer (paid or not)
    would have cost on the baseline model, without the cache.
    """

    requests: int = 0
    hits: int = 0
    input: int = 0
    output: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    cache_read: int = 0
    cost_pico: int = 0
    saved_pico: int = 0
    baseline_pico: int = 0
    #: What the calls answered through the batch lane would have cost at list prices, less
    #: what they cost at batch rates.
    batch_saved_pico: int = 0

    def add(self, other: Totals) -> None:
        for name in METRICS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def routing_saved_pico(self) -> int:
        """What routing saved: the baseline less what was spent, what the cache saved and
        what the batch lane saved."""
        return self.baseline_pico - self.cost_pico - self.saved_pico - self.batch_saved_pico


METRICS: tuple[str, ...] = tuple(Totals.__struct_fields__)


@dataclass(frozen=True, slots=True)
class Charge:
    """One answer's share of the ledger, before it is recorded."""

    day: datetime.date
    minute: str  # "@HHMM", UTC
    model: str
    task_type: str
    totals: Totals

    @property
    def spend_pico(self) -> int:
        return self.totals.cost_pico

    def part(self, metrics: tuple[str, ...]) -> Charge:
        """The same charge with only `metrics` (CALL_METRICS or TASK_METRICS) kept."""
        totals = Totals(**{name: getattr(self.totals, name) for name in metrics})
        return Charge(self.day, self.minute, self.model, self.task_type, totals)


#: What a paid call adds (counted when its answer is recorded) ...
CALL_METRICS = (
    "requests", "input", "output", "cache_write_5m", "cache_write_1h", "cache_read", "cost_pico",
    "batch_saved_pico",
)  # fmt: skip
#: ... and what a task adds (counted once per task by the store).
TASK_METRICS = ("hits", "saved_pico", "baseline_pico")


def baseline_family(settings: Settings) -> str:
    """What `model=auto` tasks are compared with: `ledger.baseline_family`, else the router's
    default family."""
    return settings.ledger.baseline_family or settings.router.default_family


class Ledger:
    """Charges answers at the configured prices and records each task once."""

    def __init__(
        self, redis: Redis, keys: Keys, settings: Settings, available: Availability
    ) -> None:
        self._keys = keys
        self._settings = settings.ledger
        self._models = settings.claude.models
        self._baseline = baseline_family(settings)
        self._prices = PriceTable.from_settings(settings)
        self._available = available
        self._script = load(redis, "ledger", after="ledger_add")
        self._live_ttl_s = settings.results.live_ttl_s
        self._unpriced: set[str] = set()
        today = self._prices.on(datetime.datetime.now(datetime.UTC).date())
        for model in self._models.values():
            if today.rates(model) is None:
                self._warn_unpriced(model)

    @classmethod
    def for_services(cls, services: Services[Settings]) -> Ledger:
        """The worker's ledger (`services.shared(Ledger.for_services)`)."""
        return cls(services.redis, services.keys, services.settings, services.available)

    def charge(self, answer: Answer, at: datetime.datetime | None = None) -> Charge:
        """What the answer cost (0 if it was a hit), saved, and would have cost on the
        baseline model, at the prices in force on the day of `at` (default now, UTC)."""
        at = at or datetime.datetime.now(datetime.UTC)
        day = at.date()
        usage = answer.usage
        full = self._cost(answer.model, answer, day, batch=usage.batch)
        baseline = self._cost(self.baseline_model(answer.request), answer, day)
        if answer.cached:
            totals = Totals(hits=1, saved_pico=full, baseline_pico=baseline)
        else:
            totals = Totals(
                requests=1,
                input=usage.input_tokens,
                output=usage.output_tokens,
                cache_write_5m=usage.cache_creation_input_tokens
                - usage.cache_creation_1h_input_tokens,
                cache_write_1h=usage.cache_creation_1h_input_tokens,
                cache_read=usage.cache_read_input_tokens,
                cost_pico=full,
                baseline_pico=baseline,
                batch_saved_pico=(
                    self._cost(answer.model, answer, day) - full if usage.batch else 0
                ),
            )
        return Charge(day, f"@{at:%H%M}", answer.model, answer.request.type, totals)

    def baseline_model(self, request: Request) -> str:
        """The model the task asked for; for `auto`, the configured baseline family's."""
        if request.model == "auto":
            return self._models[self._baseline]
        return self._models.get(request.model, request.model)

    def _cost(self, model: str, answer: Answer, day: datetime.date, *, batch: bool = False) -> int:
        rates = self._prices.on(day).rates(model, batch=batch)
        if rates is None:
            self._warn_unpriced(model)
            return 0
        return rates.cost_pico(answer.usage)

    def _warn_unpriced(self, model: str) -> None:
        if model not in self._unpriced:
            self._unpriced.add(model)
            log.warning("no price for model %r: counted at 0 (add it to [prices])", model)

    @property
    def enabled(self) -> bool:
        return self._settings.enabled

    def add_args(self, charge: Charge, tasks: int, task_id: str) -> tuple[str, list[EncodableT]]:
        """The day's key (in `task_id`'s partition: it is written with the task's record) and
        `scripts/ledger_add.lua`'s arguments for adding `charge`."""
        args: list[EncodableT] = [
            self._settings.ttl_days * 86_400,
            self._settings.max_fields,
            f"{charge.model}|{charge.task_type}",
            f"{charge.model}|other",
            charge.minute,
            tasks,
            charge.spend_pico,
        ]
        for name in METRICS:
            if value := getattr(charge.totals, name):
                args += (name, value)
        return self._keys.ledger(charge.day.isoformat(), task_id), args

    async def record(self, task_id: str, charge: Charge) -> bool:
        """Count the task's part of `charge` (`TASK_METRICS`) unless this task was counted
        before; True if counted now. Its paid call was counted when it was recorded.

        Waits out a Redis outage rather than fail: a failure here would retry the task.
        """
        if not self._settings.enabled:
            return False
        day_key, args = self.add_args(charge.part(TASK_METRICS), tasks=1, task_id=task_id)
        keys = [self._keys.task(task_id), day_key]
        args = [self._live_ttl_s, *args]
        done = await self._available.call(lambda: self._script(keys=keys, args=args))
        return bool(done)


# ---- reading --------------------------------------------------------------------------------


class Row(msgspec.Struct, kw_only=True):
    """One day x model x type of the ledger."""

    day: datetime.date
    model: str
    type: str
    totals: Totals


class Minute(msgspec.Struct, kw_only=True):
    at: datetime.datetime  # start of the minute, UTC
    tasks: int = 0
    cost_pico: int = 0


class Entries(msgspec.Struct, kw_only=True):
    rows: list[Row]
    minutes: list[Minute]


async def read_days(redis: Redis, keys: Keys, days: Iterable[datetime.date]) -> Entries:
    """The ledger of each day (one HGETALL per day and partition, pipelined; partitions'
    rows of one day, model and type are summed, and their minutes)."""
    days = list(days)
    pipe = redis.pipeline(transaction=False)
    asked = [(day, part) for day in days for part in keys.each_partition()]
    for day, part in asked:
        pipe.hgetall(part.ledger(day.isoformat()))
    replies = await pipe.execute()
    rows: dict[tuple[datetime.date, str, str], Row] = {}
    minutes: dict[datetime.datetime, Minute] = {}
    for (day, _), reply in zip(asked, replies, strict=True):
        day_rows, day_minutes = _parse_day(day, reply)
        for row in day_rows:
            seen = rows.get((row.day, row.model, row.type))
            if seen is None:
                rows[row.day, row.model, row.type] = row
            else:
                seen.totals.add(row.totals)
        for minute in day_minutes:
            if (had := minutes.get(minute.at)) is None:
                minutes[minute.at] = minute
            else:
                had.tasks += minute.tasks
                had.cost_pico += minute.cost_pico
    return Entries(rows=list(rows.values()), minutes=sorted(minutes.values(), key=_at))


def _at(minute: Minute) -> datetime.datetime:
    return minute.at


def _parse_day(day: datetime.date, raw: Mapping[bytes, bytes]) -> tuple[list[Row], list[Minute]]:
    groups: dict[tuple[str, str], Totals] = {}
    minutes: dict[str, Minute] = {}
    for field, value in raw.items():
        name, number = field.decode(), int(value)
        if name.startswith("@"):  # @HHMM|metric
            stamp, _, metric = name.partition("|")
            hour, minute = int(stamp[1:3]), int(stamp[3:5])
            at = datetime.datetime.combine(day, datetime.time(hour, minute), datetime.UTC)
            bucket = minutes.setdefault(stamp, Minute(at=at))
            if metric in ("tasks", "cost_pico"):
                setattr(bucket, metric, number)
            continue
        model, _, rest = name.partition("|")
        task_type, _, metric = rest.rpartition("|")
        if metric in METRICS:
            totals = groups.setdefault((model, task_type), Totals())
            setattr(totals, metric, number)
    rows = [Row(day=day, model=m, type=t, totals=v) for (m, t), v in sorted(groups.items())]
    return rows, sorted(minutes.values(), key=lambda m: m.at)
