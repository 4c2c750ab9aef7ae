"""Tables read at 80 columns: no line wider than the terminal, ids never split or cut, headers
never cut to `fam…`; long errors end in an ellipsis on one line."""

from __future__ import annotations

import redis
from rich.console import Console, RenderableType

from pipeline.claude.ratelimit import LimitState
from pipeline.cli import render
from pipeline.cli.status import PipelineStatus
from pipeline.cli.watch import Poll, view
from pipeline.runtime.dlq import DeadLetter
from pipeline.runtime.keys import Keys
from pipeline.runtime.status import PauseStatus, StreamStatus
from tests.cli.test_cli import cli, dead_letter

WIDTH = 80
LONG_TASK_ID = "order-2026-01-10-7c9e6679742540de944be07fc1f0c3ae"  # 50 characters
UUID_TASK_ID = "7c9e6679742540de944be07fc1f0c3ae"
LONG_ERROR = "claude: 400 invalid_request_error: " + "the prompt is far too long; " * 20


def lines_at(renderable: RenderableType, width: int = WIDTH) -> list[str]:
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    console.print(renderable)
    return console.export_text().splitlines()


def assert_fits(lines: list[str], width: int = WIDTH) -> None:
    wide = [ln for ln in lines if len(ln) > width]
    assert not wide, "\n".join(wide)


def letter(n: int, task_id: str, error: str = LONG_ERROR) -> DeadLetter:
    return DeadLetter(dlq_id=f"17180000000{n:02d}-{n}", task_id=task_id, stage="claude-call",
                      stream="p:call:sonnet", error=error, deliveries=5, attempts=3,
                      failed_at_ms=1_718_000_000_000 + n, traceparent="", fields={})  # fmt: skip


def test_dlq_list_fits_80_columns_with_ids_whole() -> None:
    letters = [letter(1, UUID_TASK_ID), letter(2, LONG_TASK_ID), letter(3, "t-3", "boom"),
               letter(4, "x" * 90)]  # fmt: skip
    lines = lines_at(render.dlq_table(letters, now_ms=1_718_000_300_000))
    assert_fits(lines[:-3] + lines[-2:])  # but the 90-character id, which cannot fit
    text = "\n".join(lines)
    for one in letters[:3]:
        assert one.dlq_id in text and one.task_id in text  # whole, on one line
    assert "claude: 400 invalid_request_error: the prompt is far too long;" in text
    cut = [ln for ln in lines if "invalid_request_error" in ln]
    assert len(cut) == 3 and all(ln.endswith("…") for ln in cut)  # one line each, cut
    assert "  boom" in lines
    header = next(ln for ln in lines if ln.startswith("dlq id"))
    assert header.split() == ["dlq", "id", "stage", "age", "task", "id"]


def test_dlq_list_command_at_80_columns(
    env: dict[str, str], prefix: str, rclient: redis.Redis
) -> None:
    keys = Keys(prefix)
    ids = [dead_letter(rclient, keys, task, LONG_ERROR) for task in (UUID_TASK_ID, LONG_TASK_ID)]
    proc = cli({**env, "COLUMNS": str(WIDTH)}, "dlq", "list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert_fits(lines)
    for whole in (*ids, UUID_TASK_ID, LONG_TASK_ID):
        assert any(whole in ln for ln in lines), whole


def limit(key: str, family: str, big: bool) -> LimitState:
    rpm, itpm, otpm = (4_000, 400_000, 80_000) if big else (50, 50_000, 10_000)
    return LimitState(key_id=key, family=family, rpm=rpm, itpm=itpm, otpm=otpm, learned=True,
                      requests_left=rpm - 7, input_left=itpm - 12_345, output_left=otpm - 999,
                      cool_down_s=125.0, in_flight=1_234, admitted=12_345_678,
                      throttled_429=45_678, reserved_input=0, reserved_output=0,
                      refunded_input=0, refunded_output=0)  # fmt: skip


def row(stage: str, lane: str | None) -> StreamStatus:
    return StreamStatus(stage=stage, lane=lane, stream=f"p:{stage}:{lane}", backlog=1_234_567,
                        pending=123_456, lag=1_234_567, consumers=128, oldest_pending_s=7_300.0,
                        delayed=12_345, group_exists=True)  # fmt: skip


def a_status() -> PipelineStatus:
    streams = [
        row("cache-check", None),
        row("router", None),
        *(row("claude-call", f) for f in ("haiku", "sonnet", "opus")),
        row("store", None),
    ]
    paused = [PauseStatus(stage="claude-call", reason="claude: no API key (set ANTHROPIC_API_KEY)",
                          remaining_s=25.0)]  # fmt: skip
    limits = [limit("default", "sonnet", big=True), limit("batch-key-2", "haiku", big=False)]
    return PipelineStatus(streams=streams, dlq=123_456, paused=paused, server_time_ms=0,
                          limits=limits)  # fmt: skip


HEADERS = ("stage", "lane", "backlog", "pending", "consumers", "oldest", "delayed",
           "key", "family", "requests", "in tok", "out tok", "flight", "429s", "cool")  # fmt: skip


def test_status_fits_80_columns_with_headers_whole() -> None:
    lines = lines_at(render.status_view(a_status(), "redis://localhost:6379/0  prefix pipeline"))
    assert_fits(lines)
    text = "\n".join(lines)
    assert "…" not in text  # nothing cut: no `fam…`, no `reques…`
    for header in HEADERS:
        assert f" {header} " in f" {text} ".replace("\n", " "), header
    assert "batch-key-2" in text and "3,993/4,000" in text  # the request limit, exact
    assert "388k/400k" in text and "37.7k/50k" in text and "79k/80k" in text  # shortened
    assert "set ANTHROPIC_API_KEY for the workers" in text  # what to do about the pause


def test_watch_fits_80_columns() -> None:
    status = a_status()
    poll = Poll(status=status, at_s=10.0, entries_added={r.stream: 2_469 for r in status.streams},
                cache_hits=10, cache_misses=10, calls=100, throttled_429=5,
                latencies_ms=[1200, 45_000], spend_today_usd=12_345.67)  # fmt: skip
    earlier = Poll(status=status, at_s=8.0, entries_added={r.stream: 0 for r in status.streams},
                   cache_hits=0, cache_misses=0, calls=0, throttled_429=0, latencies_ms=[],
                   spend_today_usd=None)  # fmt: skip
    lines = lines_at(render.watch_view(view(poll, earlier), "redis://localhost:6379/0"))
    assert_fits(lines)
    text = "\n".join(lines)
    assert "out/s" in text and "1,234.5" in text and "…" not in text
