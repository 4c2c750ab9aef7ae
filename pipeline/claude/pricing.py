"""What a call costs, from its raw usage fields and the dated price table in config.

Prices are USD per million tokens, which is micro-dollars per token. Every rate is turned
into a whole number of pico-dollars per token when the table is loaded (checked at start),
so a cost is an exact integer and any sum of costs equals the summed tokens x price: the
ledger keeps pico-dollars and rounds to micro-dollars only when it reports.

A model id not listed is priced as its family (`pipeline.claude.routing.family_of`, the one
decision of an id's family): the family's entry, else its configured model id's. A model with
no price costs 0 (the ledger logs it); with a budget on, every family must be priced
(`check_prices`), or the budget could not bound its calls.
"""

from __future__ import annotations

import bisect
import datetime
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from pipeline.claude.routing import family_of
from pipeline.claude.settings import ClaudeSettings, PriceTableSettings, Settings
from pipeline.claude.task import Usage
from pipeline.runtime.errors import ConfigError

PICO_PER_MICRO = 1_000_000
MICRO_PER_USD = 1_000_000
_PICO_PER_TOKEN = Decimal(PICO_PER_MICRO)  # per (USD per million tokens)


@dataclass(frozen=True, slots=True)
class Rates:
    """Pico-dollars per token of each kind."""

    input: int
    output: int
    cache_write_5m: int
    cache_write_1h: int
    cache_read: int

    def cost_pico(self, usage: Usage) -> int:
        """Exact cost. `cache_creation_input_tokens` includes the 1-hour writes."""
        write_1h = usage.cache_creation_1h_input_tokens
        write_5m = usage.cache_creation_input_tokens - write_1h
        return (
            usage.input_tokens * self.input
            + usage.output_tokens * self.output
            + write_5m * self.cache_write_5m
            + write_1h * self.cache_write_1h
            + usage.cache_read_input_tokens * self.cache_read
        )


@dataclass(frozen=True, slots=True)
class DayPrices:
    """One dated table: rates by model id or family name, list price and Batch API price."""

    since: datetime.date
    list_rates: Mapping[str, Rates]
    batch_rates: Mapping[str, Rates]
    # The families (and their rules) that ids not listed are priced by.
    claude: ClaudeSettings = field(default_factory=ClaudeSettings)

    def rates(self, model: str, *, batch: bool = False) -> Rates | None:
        """The model id's own rates, else its family's (the family's entry, else its
        configured model id's); None if none is listed."""
        table = self.batch_rates if batch else self.list_rates
        found = table.get(model)
        if found is not None:
            return found
        family = family_of(model, self.claude)
        if family is None:
            return None
        found = table.get(family)
        return found if found is not None else table.get(self.claude.models[family])

    def unpriced(self) -> dict[str, str]:
        """Family -> configured model id, for every family this table has no price for."""
        models = self.claude.models
        return {family: models[family] for family in models if self.rates(models[family]) is None}


class PriceTable:
    """Every dated table of `settings.prices`, oldest first."""

    def __init__(self, days: list[DayPrices]) -> None:
        self._days = sorted(days, key=lambda d: d.since)
        self._starts = [d.since for d in self._days]

    @classmethod
    def from_settings(cls, settings: Settings) -> PriceTable:
        """Load and check the tables: whole pico-dollar rates, distinct dates (raises
        ConfigError naming the field)."""
        tables = settings.prices.tables
        if not tables:
            raise ConfigError("prices.tables", "needs at least one table")
        days = [
            _day_prices(table, f"prices.tables[{i}]", settings.claude)
            for i, table in enumerate(tables)
        ]
        seen: dict[datetime.date, int] = {}
        for i, day in enumerate(days):
            if day.since in seen:
                where = f"prices.tables[{i}].from"
                raise ConfigError(where, f"{day.since} is also table {seen[day.since]}'s date")
            seen[day.since] = i
        return cls(days)

    def on(self, day: datetime.date) -> DayPrices:
        """The table in force on `day` (the oldest one for days before every table)."""
        return self._days[max(0, bisect.bisect_right(self._starts, day) - 1)]

    def cost_pico(
        self, model: str, usage: Usage, day: datetime.date | None = None, *, batch: bool = False
    ) -> int:
        """Exact cost at the table in force on `day` (default today, UTC); 0 if unpriced."""
        rates = self.on(day or today()).rates(model, batch=batch)
        return rates.cost_pico(usage) if rates else 0

    def cost_micro_usd(
        self, model: str, usage: Usage, day: datetime.date | None = None, *, batch: bool = False
    ) -> int:
        return micro_usd(self.cost_pico(model, usage, day, batch=batch))


def check_prices(settings: Settings, day: datetime.date | None = None) -> PriceTable:
    """Start-up validation of `[prices]` (through `PriceTable.from_settings`) and, with a
    budget on, that every table in force from `day` (default today, UTC) on prices every
    family: an unpriced call would reserve and settle 0, so no budget would bound it.

    Raises:
        ConfigError: e.g. `prices.tables[0].models: no price for family 'fable'
            (claude-fable-5): the budget cannot bound its calls; add fable = { input = ...,
            output = ... }`.
    """
    prices = PriceTable.from_settings(settings)
    budget = settings.budget
    if budget.daily_usd is None and not budget.types:
        return prices  # an unpriced model costs 0, and the ledger logs it
    current = prices.on(day or today()).since  # past tables price past days only
    for i, table in enumerate(settings.prices.tables):
        unpriced = prices.on(table.from_).unpriced() if table.from_ >= current else {}
        if unpriced:
            family, model_id = next(iter(unpriced.items()))
            raise ConfigError(
                f"prices.tables[{i}].models",
                f"no price for family {family!r} ({model_id}): the budget cannot bound its "
                f"calls; add {family} = {{ input = ..., output = ... }} (USD per million tokens)",
            )
    return prices


def _day_prices(table: PriceTableSettings, where: str, claude: ClaudeSettings) -> DayPrices:
    def rates(scale: float) -> dict[str, Rates]:
        out = {}
        for name, price in table.models.items():
            at = f"{where}.models.{name}"
            out[name] = Rates(
                input=_pico(price.input, scale, f"{at}.input"),
                output=_pico(price.output, scale, f"{at}.output"),
                cache_write_5m=_pico(price.input, scale * table.cache_write_5m, f"{at}.input"),
                cache_write_1h=_pico(price.input, scale * table.cache_write_1h, f"{at}.input"),
                cache_read=_pico(price.input, scale * table.cache_read, f"{at}.input"),
            )
        return out

    return DayPrices(
        since=table.from_, list_rates=rates(1.0), batch_rates=rates(table.batch), claude=claude
    )


def _pico(usd_per_mtok: float, multiple: float, where: str) -> int:
    """Pico-dollars per token; refuses a rate finer than that (it would drift)."""
    if not (math.isfinite(usd_per_mtok) and usd_per_mtok >= 0):
        raise ConfigError(where, f"must be a number >= 0, got {usd_per_mtok}")
    exact = Decimal(repr(usd_per_mtok)) * Decimal(repr(multiple)) * _PICO_PER_TOKEN
    if exact != exact.to_integral_value():
        raise ConfigError(
            where,
            f"{usd_per_mtok} USD/MTok x {multiple} is not a whole number of pico-dollars per "
            "token (use fewer decimal places)",
        )
    return int(exact)


def today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


def micro_usd(pico: int) -> int:
    """Pico-dollars rounded to micro-dollars, half to even (no bias in sums of roundings)."""
    whole, rest = divmod(pico, PICO_PER_MICRO)
    half = PICO_PER_MICRO // 2
    return whole + (rest > half or (rest == half and whole % 2 == 1))


#: The default tables (Settings()), for callers without settings of their own.
DEFAULT_PRICES = PriceTable.from_settings(Settings())


def cost_micro_usd(model: str, usage: Usage) -> int:
    """The cost of one call at today's default prices; 0 for a model with no known price."""
    return DEFAULT_PRICES.cost_micro_usd(model, usage)


def usd(micro: int) -> str:
    """Micro-dollars as the decimal string stored in results (`cost_usd`)."""
    whole, frac = divmod(abs(micro), MICRO_PER_USD)
    return f"{'-' if micro < 0 else ''}{whole}.{frac:06d}"
