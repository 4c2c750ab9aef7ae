"""Each Messages call reports what it did to its caller (who hands it to the worker's hooks)."""

from __future__ import annotations

import pytest

from pipeline.claude.api import call
from pipeline.runtime.calls import CallReport
from pipeline.runtime.errors import TransientError
from tests.conftest import StartFake
from tests.stages.test_claude_call import client_for, routed

pytestmark = pytest.mark.anyio


async def test_every_call_is_reported_with_status_usage_and_headers(
    start_fake: StartFake,
) -> None:
    fake = start_fake(rpm=1)
    reports: list[CallReport] = []
    system = [{"type": "text", "text": "x " * 800, "cache_control": {"type": "ephemeral"}}]
    async with client_for(fake) as client:
        answer = await call(client, routed(system=system), on_report=reports.append)
        with pytest.raises(TransientError):
            await call(client, routed(), on_report=reports.append)
    ok, limited = reports
    assert ok.status == 200 and ok.error_type is None and ok.usage == answer.usage
    assert ok.response_model == answer.model and ok.family == "haiku"
    assert ok.ended_ns >= ok.started_ns
    assert ok.headers is not None and "anthropic-ratelimit-requests-limit" in ok.headers
    assert limited.status == 429 and limited.error_type == "TransientError"
    assert limited.usage is None and limited.headers is not None
    assert "retry-after" in limited.headers
    # The fake wrote the cache with the default 5-minute TTL: no 1-hour writes.
    assert answer.usage.cache_creation_input_tokens > 0
    assert answer.usage.cache_creation_1h_input_tokens == 0


async def test_a_broken_observer_never_fails_the_call(start_fake: StartFake) -> None:
    fake = start_fake()

    def broken(report: CallReport) -> None:
        raise RuntimeError("observer bug")

    async with client_for(fake) as client:
        answer = await call(client, routed(), on_report=broken)
    assert answer.output
