"""What a call costs, from its raw usage fields and the dated price table in config.

Prices are USD per million tokens, which is micro-dollars per token. Every rate is turned
into a whole number of pico-dollars per token when the table is loaded (checked at start),
so a cost is an exact integer and any sum of costs equals the summed tokens x price: the
ledger keeps pico-dollars and rounds to micro-dollars only when it reports.
"""

from __future__ import annotations

import bisect
import datetime
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from pipeline.claude.settings import PriceTableSettings, Settings
from pipeline.claude.task import Usage
from pipeline.runtime.errors import ConfigError

PICO_PER_MICRO = 1_000_000
MICRO_PER_USD = 1_000_000
_PICO_PER_TOKEN = Decimal(PICO_PER_MICRO)  # per (USD per million tokens)
_ID_TOKENS = re.compile(r"[-.:@/_]")


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

    def rates(self, model: str, *, batch: bool = False) -> Rates | None:
        """The model id's own rates, else its family's; None if neither is listed."""
        table = self.batch_rates if batch else self.list_rates
        found = table.get(model)
        if found is not None:
            return found
        tokens = set(_ID_TOKENS.split(model.lower()))
        return next((rates for name, rates in table.items() if name in tokens), None)


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
        days = [_day_prices(table, f"prices.tables[{i}]") for i, table in enumerate(tables)]
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


def _day_prices(table: PriceTableSettings, where: str) -> DayPrices:
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

    return DayPrices(since=table.from_, list_rates=rates(1.0), batch_rates=rates(table.batch))


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
