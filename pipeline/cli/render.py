"""How the `pipeline` command shows things: tables for status, results and dead letters.

Every value that came from Redis goes in as `Text`, never as markup, so a prompt or an error
message containing `[red]` is shown as written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.json import JSON
from rich.table import Table
from rich.text import Text

from pipeline.claude.batch_status import LaneView
from pipeline.claude.ratelimit import LimitState
from pipeline.cli.diagnose import pause_hint
from pipeline.cli.status import PipelineStatus
from pipeline.cli.watch import WatchView
from pipeline.runtime.dlq import DeadLetter
from pipeline.runtime.redis_durability import RedisDurability
from pipeline.runtime.results import RESULT_FIELDS

#: Pending entries older than these (seconds) are shown in yellow, then red.
OLD_PENDING_S = (60.0, 300.0)


def age(seconds: float | None) -> str:
    """`4.2s`, `5m 03s`, `2h 05m`, `3d 04h`: short and sortable by eye."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def shorten(text: str, width: int) -> str:
    """One line, at most `width` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _count(n: int, warn: bool = False) -> Text:
    return Text(f"{n:,}", style="bold yellow" if warn and n else "")


def _pretty(value: str) -> RenderableType:
    """JSON objects and arrays (messages, metadata) indented; anything else as plain text."""
    if value[:1] in "[{":
        try:
            json.loads(value)
        except ValueError:
            pass
        else:
            return JSON(value)
    return Text(value)


def status_view(
    status: PipelineStatus, where: str, rates: Sequence[float | None] | None = None
) -> RenderableType:
    """Per stage and lane: backlog, pending, consumers, oldest pending, delayed (and, given
    `rates` per row, entries handed on per second); then the DLQ, paused stages and Redis's
    eviction and persistence, coloured when they need attention. Fits 80 columns with every
    lane and seven-digit counts; the lag (undelivered entries: backlog less pending) is in
    `--json`."""
    paused = {p.stage for p in status.paused}
    table = Table(
        title=Text(f"pipeline status  {where}"),
        title_justify="left",
        caption="oldest: age of the oldest pending entry; delayed: to be retried",
        caption_justify="left",
        box=box.SIMPLE_HEAVY,  # no vertical rules
        pad_edge=False,
        show_edge=False,
        collapse_padding=True,
    )
    for name in ("stage", "lane"):
        table.add_column(name, no_wrap=True)
    for name in ("backlog", "pending", "consumers", "oldest", "delayed"):
        table.add_column(name, justify="right", no_wrap=True)
    if rates is not None:
        table.add_column("out/s", justify="right", no_wrap=True)
    for i, row in enumerate(status.streams):
        oldest = Text(age(row.oldest_pending_s))
        if row.oldest_pending_s is not None and row.oldest_pending_s >= OLD_PENDING_S[0]:
            old = row.oldest_pending_s >= OLD_PENDING_S[1]
            oldest.stylize("bold red" if old else "yellow")
        consumers = Text(f"{row.consumers:,}") if row.group_exists else Text("none", "dim")
        stage = Text(row.stage, style="bold red" if row.stage in paused else "")
        table.add_row(
            stage,
            Text(row.lane or "-"),
            _count(row.backlog),
            _count(row.pending),
            consumers,
            oldest,
            _count(row.delayed, warn=True),
            *([] if rates is None else [Text(_rate(rates[i]))]),
        )
    dlq = Text("DLQ: ", style="bold")
    dlq.append(f"{status.dlq:,} entries", style="bold red" if status.dlq else "green")

    if status.dlq:
        dlq.append("  (pipeline dlq list)", style="dim")
    lines: list[RenderableType] = [table, dlq]
    if status.partitions:
        lines.append(partitions_line(status))
    if status.limits:
        lines.insert(1, limits_view(status.limits))
    lines += _batch_lines(status.batch_lanes)
    if not status.paused:
        lines.append(Text.assemble(("paused: ", "bold"), ("none", "green")))
    else:
        pauses = Table.grid(padding=(0, 1))
        pauses.add_column(no_wrap=True)
        pauses.add_column()
        for pause in status.paused:
            line = Text.assemble((pause.stage, "bold red"), " - ", pause.reason)
            if pause.remaining_s is not None:
                line.append(f"  ({age(pause.remaining_s)} left)", style="dim")
            pauses.add_row(Text("paused:", style="bold"), line)
            pauses.add_row(Text(""), Text(pause_hint(pause.reason), style="dim"))
        lines.append(pauses)
    if status.redis is not None:
        lines.append(durability_view(status.redis))
    return Group(*lines)


def partitions_line(status: PipelineStatus) -> Text:
    """With partitions: how many, and what waits between them and what producers touch (the
    rows above sum every partition)."""
    line = Text.assemble(("partitions: ", "bold"), f"{status.partitions}  ")
    line.append(f"{status.unmoved or 0:,} tasks to move in, ")
    line.append(f"{status.unpublished or 0:,} results to publish")
    line.append("  (rows above: every partition summed)", style="dim")
    return line


#: Findings that say data will be lost (red), as opposed to "cannot tell" (yellow).
_LOSES = frozenset({"eviction", "no-persistence", "snapshot-failing", "aof-failing"})


def durability_view(found: RedisDurability) -> RenderableType:
    """`redis:` then the eviction policy and persistence (one short line each, to fit 80
    columns), then each finding, wrapped under itself."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    policy = found.maxmemory_policy
    style = "green" if policy == "noeviction" else "bold red" if policy else "yellow"
    grid.add_row(Text("redis:", style="bold"), Text(found.eviction, style=style))
    persistence = found.persistence
    if found.aof_enabled:
        style = "green"
    elif persistence.startswith("none"):
        style = "bold red"
    else:
        style = "yellow" if "unknown" in persistence else ""
    grid.add_row(Text(""), Text(f"persistence {persistence}", style=style))
    if found.config_refused:
        grid.add_row(Text(""), Text("(read from INFO: CONFIG GET refused)", style="dim"))
    for finding in found.findings:
        style = "bold red" if finding.code in _LOSES else "bold yellow"
        grid.add_row(Text("  !", style=style), Text(finding.line))
    return grid


def limits_view(limits: Sequence[LimitState]) -> RenderableType:
    """Per API key x model family: what is left of each per-minute limit, the calls in
    flight with the key, 429s and cool-downs; short headers and numbers, to fit 80 columns
    (`--json` has every counter, exact). A limit shows `?` until learned."""
    table = Table(
        title=Text("rate limits (shared by every worker)"),
        title_justify="left",
        caption="left/limit per minute; flight: calls in flight with the key",
        caption_justify="left",
        box=box.SIMPLE_HEAVY,
        pad_edge=False,
        show_edge=False,
        collapse_padding=True,
    )
    table.add_column("key", no_wrap=True)
    table.add_column("family", no_wrap=True)
    for name in ("requests", "in tok", "out tok", "flight", "429s", "cool"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in limits:
        cool = Text("-")
        if row.cool_down_s > 0:
            cool = Text(age(row.cool_down_s), style="bold yellow")
        table.add_row(
            Text(row.key_id),
            Text(row.family),
            Text(_left(row.requests_left, row.rpm, row.learned)),
            Text(_left(row.input_left, row.itpm, row.learned)),
            Text(_left(row.output_left, row.otpm, row.learned)),
            Text(f"{row.in_flight:,}"),
            _count(row.throttled_429, warn=True),
            cool,
        )
    return table


def _left(level: float | None, limit: int | None, learned: bool) -> str:
    if limit is None:
        return "unlimited" if learned else "?"
    return f"{_compact(max(0, int(level or 0)))}/{_compact(limit)}"


def _compact(n: int) -> str:
    """`9,999`, `40k`, `2.5M`: at most 5 characters for the numbers limits have."""
    if n < 10_000:
        return f"{n:,}"
    if n < 100_000:
        return f"{n / 1000:.1f}".removesuffix(".0") + "k"
    if n < 1_000_000:
        return f"{n / 1000:.0f}k"
    return f"{n / 1_000_000:.1f}".removesuffix(".0") + "M"


def watch_view(watch: WatchView, where: str) -> RenderableType:
    """`status --watch`: the status table with throughput, then the rates of the interval."""
    status = watch.poll.status
    lines: list[RenderableType] = [status_view(status, where, [r.per_s for r in watch.rates])]
    cache = Text.assemble(("cache hits: ", "bold"), _percent(watch.cache_hit_rate))
    cache.append(f" of lookups now, {_percent(watch.cache_hit_rate_total)} overall", style="dim")
    line_429 = Text.assemble(("429s: ", "bold"), _percent(watch.rate_429))
    line_429.append(" of calls admitted by the rate limiter", style="dim")
    if watch.rate_429:
        line_429.stylize("bold yellow", 6)
    latency = Text.assemble(("end to end: ", "bold"))
    if watch.p50_ms is None or watch.p99_ms is None:
        latency.append("-  (no recent completions)", style="dim")
    else:
        latency.append(f"p50 {age(watch.p50_ms / 1000)}  p99 {age(watch.p99_ms / 1000)}")
        latency.append(f"  (last {len(watch.poll.latencies_ms)} completions)", style="dim")
    spend = watch.poll.spend_today_usd
    lines += [
        cache,
        line_429,
        latency,
        Text.assemble(("spend today (UTC): ", "bold"), "-" if spend is None else f"${spend:,.2f}"),
        Text("per-stage p99: Grafana (pipeline_stage_duration_seconds); Ctrl-C exits", "dim"),
    ]
    return Group(*lines)


def _rate(per_s: float | None) -> str:
    return "-" if per_s is None else f"{per_s:,.1f}"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.1%}"


def result_view(task_id: str, result: Mapping[str, str]) -> RenderableType:
    """The result hash, known fields first, JSON values indented; fields that would say
    nothing (an empty error or id, content that is just the output) left out."""
    status = result.get("status", "")
    table = Table(show_header=False, title=Text(f"result {task_id}"), title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    order = [f for f in RESULT_FIELDS if f in result] + sorted(set(result) - set(RESULT_FIELDS))
    for name in order:
        value = result[name]
        if name == "status":
            table.add_row(name, Text(value, style="green" if status == "completed" else "red"))
        elif not _says_nothing(name, value, result):
            table.add_row(name, _pretty(value))
    return table


_EMPTY_UNLESS_SET = frozenset({"error", "stop_sequence", "message_id", "request_id"})


def _says_nothing(name: str, value: str, result: Mapping[str, str]) -> bool:
    if name in _EMPTY_UNLESS_SET:
        return not value
    if name == "content":
        plain = [{"type": "text", "text": result.get("output", "")}]
        try:
            return value in ("", "[]") or json.loads(value) == plain
        except ValueError:
            return False
    return False


def _batch_lines(lanes: Sequence[LaneView]) -> list[RenderableType]:
    """One line per family whose batch lane holds anything (`pipeline batches list`)."""
    lines: list[RenderableType] = []
    for lane in lanes:
        if not lane.queued and not lane.batches:
            continue
        line = Text(f"batch lane {lane.family}: ", style="bold")
        line.append(f"{lane.queued:,} queued")
        if lane.oldest_queued_s is not None:
            line.append(f" (oldest {age(lane.oldest_queued_s)})")
        waiting = sum(b.unanswered for b in lane.batches)
        line.append(f", {len(lane.batches)} batches open, {waiting:,} to hand on")
        if lane.batches:
            line.append(f", oldest {age(max(b.age_s for b in lane.batches))}")
        lines.append(line)
    return lines


def batches_table(lanes: Sequence[LaneView]) -> RenderableType:
    """Per family, what waits for a batch and each open batch (API ids whole, never cut);
    fits 80 columns."""
    table = Table(title=Text("batch lane", style="bold"), title_justify="left", box=None,
                  padding=(0, 1), pad_edge=False, header_style="bold underline")  # fmt: skip
    for name in ("family", "batch", "state"):
        table.add_column(name, no_wrap=True)
    for name in ("requests", "left", "age"):
        table.add_column(name, justify="right", no_wrap=True)
    for lane in lanes:
        if lane.queued:
            oldest = age(lane.oldest_queued_s or 0.0)
            table.add_row(lane.family, "(queued)", "waiting", _count(lane.queued), "-", oldest)
        for batch in lane.batches:
            shown = batch.batch_id or batch.token
            table.add_row(lane.family, shown, batch.state, _count(batch.requests),
                          _count(batch.unanswered), age(batch.age_s))  # fmt: skip
    if not table.rows:
        return Text("The batch lane is empty.", style="green")
    return table


def dlq_table(letters: Sequence[DeadLetter], now_ms: int | None = None) -> RenderableType:
    """Newest first, two lines a letter, to fit any width: the DLQ id, stage, age and task id
    (ids whole, never split), then the error on a line of its own, cut with an ellipsis."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if not letters:
        return Text("The DLQ is empty.", style="green")
    return _DeadLetterList(list(letters), now_ms)


class _DeadLetterList:
    """`dlq_table`'s lines, laid out for the console's width when printed."""

    HEADERS = ("dlq id", "stage", "age", "task id")

    def __init__(self, letters: list[DeadLetter], now_ms: int) -> None:
        self.letters = letters
        self.rows = [
            (
                letter.dlq_id,
                letter.stage,
                age(max(0, now_ms - letter.failed_at_ms) / 1000) if letter.failed_at_ms else "-",
                letter.task_id,
            )
            for letter in letters
        ]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) for i, h in enumerate(self.HEADERS)]
        yield Text(f"DLQ: {len(self.letters)} shown, newest first", style="bold")
        yield Text("  ".join(self._cells(self.HEADERS, widths)).rstrip(), style="bold")
        for letter, row in zip(self.letters, self.rows, strict=True):
            line = "  ".join(self._cells(row, widths)).rstrip()
            if len(line) <= width:
                yield Text(line, no_wrap=True, overflow="ignore")
            else:  # a task id too long for the line: on a line of its own, whole
                yield Text("  ".join(self._cells(row[:3], widths)).rstrip())
                yield Text(f"  task {row[3]}", overflow="fold")
            yield Text("  " + shorten(letter.error, max(10, width - 2)), style="red",
                       no_wrap=True, overflow="ellipsis")  # fmt: skip
        yield Text("pipeline dlq show ID (a DLQ or task id): one in full", style="dim")

    @staticmethod
    def _cells(row: Sequence[str], widths: Sequence[int]) -> list[str]:
        return [
            cell.rjust(w) if i == 2 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=False))
        ]


def dead_letter_view(letter: DeadLetter) -> RenderableType:
    """Every field of one dead letter, and the task's original fields pretty-printed."""
    when = datetime.fromtimestamp(letter.failed_at_ms / 1000, UTC) if letter.failed_at_ms else None
    meta = Table(
        show_header=False, title=Text(f"dead letter {letter.dlq_id}"), title_justify="left"
    )
    meta.add_column("field", style="bold")
    meta.add_column("value", overflow="fold")
    since = f" ({age(time.time() - letter.failed_at_ms / 1000)} ago)" if when else ""
    rows = {
        "task id": letter.task_id,
        "stage": letter.stage,
        "stream": letter.stream,
        "error": letter.error,
        "deliveries": str(letter.deliveries),
        "attempts": str(letter.attempts),
        "failed at": f"{when:%Y-%m-%d %H:%M:%S} UTC{since}" if when else "-",
        "traceparent": letter.traceparent or "-",
    }
    for name, value in rows.items():
        meta.add_row(name, Text(value, style="red" if name == "error" else ""))
    fields = Table(show_header=False, title=Text("original fields"), title_justify="left")
    fields.add_column("field", style="bold")
    fields.add_column("value", overflow="fold")
    for name, value in letter.fields.items():
        fields.add_row(name, _pretty(value))
    return Group(meta, fields)


__all__ = [
    "age",
    "dead_letter_view",
    "dlq_table",
    "durability_view",
    "limits_view",
    "partitions_line",
    "result_view",
    "shorten",
    "status_view",
    "watch_view",
]
