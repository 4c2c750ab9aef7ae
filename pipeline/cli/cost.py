"""`pipeline cost`: the ledger for a day or a range, savings, and per-day projections.

Registered on `pipeline.cli.app`. Savings compare what was spent with sending every task to
its baseline model (the model it asked for, else the baseline family, Sonnet) without the
response cache: the cache's share is what its hits would have cost at their own model, and
routing's share is the rest. Money is exact (pico-dollars in the ledger), shown in dollars.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import typer
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.table import Table
from rich.text import Text

from pipeline.claude.ledger import Minute, Totals, baseline_family, read_days
from pipeline.claude.pricing import micro_usd, usd
from pipeline.claude.settings import Settings
from pipeline.cli.common import ConfigOpt, JsonOpt, connection, out, run_async, settings_from

#: Longest range one command reads (the ledger keeps 400 days by default).
MAX_DAYS = 1000
BY = ("model", "type")


@dataclass
class CostReport:
    """The ledger summed over `first`..`last` (UTC days, inclusive)."""

    first: datetime.date
    last: datetime.date
    baseline_family: str
    now: datetime.datetime
    by_model: dict[str, Totals] = field(default_factory=dict)
    by_type: dict[str, Totals] = field(default_factory=dict)
    total: Totals = field(default_factory=Totals)
    last_hour: Minute | None = None  # tasks and spend of the 60 minutes before `now`
    tasks_per_day: int | None = None  # the scenario to project the range's mix to

    @property
    def tasks(self) -> int:
        return self.total.requests + self.total.hits

    def at_rate(self, pico: int) -> int:
        """`pico` of the range scaled to `tasks_per_day` tasks (0 without tasks)."""
        if not self.tasks or self.tasks_per_day is None:
            return 0
        return pico * self.tasks_per_day // self.tasks


def parse_day(text: str, option: str) -> datetime.date:
    """A YYYY-MM-DD day, or `today`/`yesterday` (UTC)."""
    today = datetime.datetime.now(datetime.UTC).date()
    named = {"today": today, "yesterday": today - datetime.timedelta(days=1)}
    if text.lower() in named:
        return named[text.lower()]
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a day: use YYYY-MM-DD, today or yesterday", param_hint=option
        ) from None


def day_range(
    day: str | None, since: str | None, until: str | None
) -> tuple[datetime.date, datetime.date]:
    """`--day D`, or `--since D [--until D]` (until defaults to today); default today."""
    if day is not None and (since is not None or until is not None):
        raise typer.BadParameter("give --day, or --since/--until, not both")
    if until is not None and since is None:
        raise typer.BadParameter("--until needs --since")
    if since is None:
        one = parse_day(day or "today", "--day")
        return one, one
    first, last = parse_day(since, "--since"), parse_day(until or "today", "--until")
    if first > last:
        raise typer.BadParameter(f"--since {first} is after --until {last}")
    if (last - first).days >= MAX_DAYS:
        raise typer.BadParameter(f"at most {MAX_DAYS} days at once")
    return first, last


async def gather_cost(
    settings: Settings,
    first: datetime.date,
    last: datetime.date,
    *,
    tasks_per_day: int | None = None,
    now: datetime.datetime | None = None,
) -> CostReport:
    """Read the range's days (and the last hour, for the current rate) and sum them."""
    now = now or datetime.datetime.now(datetime.UTC)
    days = [first + datetime.timedelta(days=n) for n in range((last - first).days + 1)]
    recent = [now.date() - datetime.timedelta(days=1), now.date()]
    async with connection(settings) as (redis, keys):
        entries = await read_days(redis, keys, days)
        minutes = (await read_days(redis, keys, recent)).minutes
    report = CostReport(first, last, baseline_family(settings), now, tasks_per_day=tasks_per_day)
    for row in entries.rows:
        report.by_model.setdefault(row.model, Totals()).add(row.totals)
        report.by_type.setdefault(row.type, Totals()).add(row.totals)
        report.total.add(row.totals)
    hour_ago = now - datetime.timedelta(hours=1)
    report.last_hour = Minute(at=hour_ago)
    for minute in minutes:
        if hour_ago <= minute.at < now:
            report.last_hour.tasks += minute.tasks
            report.last_hour.cost_pico += minute.cost_pico
    return report


# ---- rendering ------------------------------------------------------------------------------


def money(pico: int) -> str:
    """Exact dollars, to the micro-dollar, with thousands separators."""
    whole, _, frac = usd(micro_usd(pico)).partition(".")
    return f"${int(whole):,}.{frac}"


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def cost_view(report: CostReport, by: tuple[str, ...] = BY) -> RenderableType:
    """Tables by model and by type, then the savings and the projections."""
    span = str(report.first) if report.first == report.last else f"{report.first} .. {report.last}"
    parts: list[RenderableType] = [Text(f"pipeline cost  {span} (UTC days)", style="bold")]
    for name in by:
        groups = report.by_model if name == "model" else report.by_type
        parts.append(_table(name, groups, report.total))
    total, base = report.total, report.total.baseline_pico
    savings = Table.grid(padding=(0, 2))
    savings.add_column()
    savings.add_column(justify="right")
    savings.add_column()
    baseline = f"all to the requested model, else {report.baseline_family}; no cache"
    savings.add_row("baseline", money(base), Text(baseline, style="dim"))
    savings.add_row("cache saved", money(total.saved_pico), f"{total.hits:,} cache hits")
    savings.add_row("batch saved", money(total.batch_saved_pico), "batch lane, half price")
    savings.add_row("routing saved", money(total.routing_saved_pico), "")
    spent = f"{_share(base - total.cost_pico, base)} less than the baseline"
    savings.add_row(Text("spent", style="bold"), Text(money(total.cost_pico), "bold"), spent)
    parts += [Text("savings", style="bold"), savings, Text("projections", style="bold")]
    parts.append(_projections(report))
    return Group(*parts)


def _table(by: str, groups: dict[str, Totals], total: Totals) -> RenderableType:
    """Fits 80 columns: tokens and money are shortened here (exact in the JSON)."""
    columns: dict[str, Callable[[Totals], str]] = {
        "calls": lambda t: f"{t.requests:,}",
        "hits": lambda t: f"{t.hits:,}",
        "in": lambda t: _tokens(t.input),
        "out": lambda t: _tokens(t.output),
        "cache w": lambda t: _tokens(t.cache_write_5m + t.cache_write_1h),
        "cache r": lambda t: _tokens(t.cache_read),
        "spent": lambda t: _short_money(t.cost_pico),
    }
    rows = [(name, [cell(totals) for cell in columns.values()])
            for name, totals in sorted(groups.items())]  # fmt: skip
    return _GroupTable(by, list(columns), rows, [cell(total) for cell in columns.values()])


class _GroupTable:
    """`_table`'s lines, laid out for the console's width when printed. A model id or task
    type is never split: one too long to sit beside its numbers (a dated model id such as
    claude-sonnet-4-5-20250929 at 80 columns) has a line of its own, its numbers under it."""

    GAP = "   "

    def __init__(self, by: str, headers: list[str], rows: list[tuple[str, list[str]]],
                 total: list[str]) -> None:  # fmt: skip
        self.by, self.headers, self.rows, self.total = by, headers, rows, total

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        pairs = enumerate(zip(self.headers, self.total, strict=True))
        widths = [max(len(h), len(t), *(len(cells[i]) for _, cells in self.rows))
                  for i, (h, t) in pairs]  # fmt: skip
        room = options.max_width - sum(widths) - len(self.GAP) * len(widths)
        label = max(len(self.by), len("total"),
                    *(len(name) for name, _ in self.rows if len(name) <= room))  # fmt: skip

        def line(first: str, cells: list[str]) -> str:
            numbers = (self.GAP + cell.rjust(w) for cell, w in zip(cells, widths, strict=True))
            return first.ljust(label) + "".join(numbers)

        rule = Text("━" * len(line("", self.total)))
        yield Text(line(self.by, self.headers), style="bold")
        yield rule
        for name, cells in self.rows:
            if len(name) <= label:
                yield Text(line(name, cells))
            else:
                yield Text(name, overflow="fold")
                yield Text(line("", cells))
        if not self.rows:
            yield Text("nothing recorded", style="dim")
        yield rule
        yield Text(line("total", self.total), style="bold")


def _tokens(n: int) -> str:
    if n < 100_000:
        return f"{n:,}"
    return f"{n / 1000:,.0f}k" if n < 10_000_000 else f"{n / 1_000_000:,.1f}M"


def _short_money(pico: int) -> str:
    """To the micro-dollar below $100, to the cent above."""
    exact = money(pico)
    return exact if micro_usd(pico) < 100_000_000 else exact[:-4]


def _projections(report: CostReport) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column()
    grid.add_column(justify="right")
    grid.add_column()
    hour = report.last_hour or Minute(at=report.now)
    grid.add_row(
        "per day at the last hour's rate",
        money(hour.cost_pico * 24),
        Text(f"x 24 ({hour.tasks:,} tasks, hour to {report.now:%H:%M} UTC)", "dim"),
    )
    if report.tasks_per_day is not None:
        n = f"{report.tasks_per_day:,} tasks/day"
        grid.add_row(f"per day at {n}", money(report.at_rate(report.total.cost_pico)),
                     Text("cache + routing, this range's mix", "dim"))  # fmt: skip
        grid.add_row(f"baseline at {n}", money(report.at_rate(report.total.baseline_pico)),
                     Text(f"all-{report.baseline_family}, no cache", "dim"))  # fmt: skip
    return grid


def dollars(pico: int) -> float:
    """Money for JSON: a number of USD, to the micro-dollar (exact in the `_pico` integers)."""
    return float(usd(micro_usd(pico)))


def cost_json(report: CostReport, by: tuple[str, ...] = BY) -> dict[str, Any]:
    """For scripts: token counts, and money both in exact pico-dollars (integers) and in USD
    (numbers, to the micro-dollar)."""

    def totals(t: Totals) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(t)
        out["routing_saved_pico"] = t.routing_saved_pico
        for name in ("cost", "saved", "baseline", "routing_saved", "batch_saved"):
            out[f"{name}_usd"] = dollars(out[f"{name}_pico"])
        return out

    hour = report.last_hour or Minute(at=report.now)
    data: dict[str, Any] = {
        "first": str(report.first),
        "last": str(report.last),
        "baseline_family": report.baseline_family,
        "total": totals(report.total),
        "last_hour": {
            "tasks": hour.tasks,
            "cost_pico": hour.cost_pico,
            "per_day_usd": dollars(hour.cost_pico * 24),
        },
    }
    if "model" in by:
        data["by_model"] = {k: totals(v) for k, v in sorted(report.by_model.items())}
    if "type" in by:
        data["by_type"] = {k: totals(v) for k, v in sorted(report.by_type.items())}
    if report.tasks_per_day is not None:
        base_pico = report.total.baseline_pico
        cost, baseline = report.at_rate(report.total.cost_pico), report.at_rate(base_pico)
        data["per_day"] = {
            "tasks": report.tasks_per_day,
            "cost_pico": cost,
            "cost_usd": dollars(cost),
            "baseline_pico": baseline,
            "baseline_usd": dollars(baseline),
        }
    return data


# ---- the command ----------------------------------------------------------------------------


def cost(
    day: Annotated[
        str | None, typer.Option(help="One UTC day (YYYY-MM-DD, today, yesterday); default today.")
    ] = None,
    since: Annotated[str | None, typer.Option(help="First day of a range (UTC).")] = None,
    until: Annotated[
        str | None, typer.Option(help="Last day of the range, inclusive (default today).")
    ] = None,
    by: Annotated[
        str | None, typer.Option(help="Only one table: model or type (default both).")
    ] = None,
    tasks_per_day: Annotated[
        int | None,
        typer.Option(min=1, help="Also project the range's mix to this many tasks a day."),
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Tokens and cost by model and type, savings from cache and routing, per-day projection."""
    if by is not None and by not in BY:
        raise typer.BadParameter(f"{by!r}: use model or type", param_hint="--by")
    tables = BY if by is None else (by,)
    first, last = day_range(day, since, until)
    report = run_async(gather_cost(settings_from(config), first, last, tasks_per_day=tasks_per_day))
    if as_json:
        out.print_json(data=cost_json(report, tables))
    else:
        out.print(cost_view(report, tables))


__all__ = ["CostReport", "cost", "cost_json", "cost_view", "dollars", "gather_cost"]
