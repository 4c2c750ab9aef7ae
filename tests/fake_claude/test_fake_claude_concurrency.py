"""2,000 simultaneous SDK calls over loopback: no connect errors, all of them in flight at once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anthropic
import httpx2
import pytest

from pipeline.fake_claude import FakeClaudeConfig, raise_open_files_limit, start_fake_claude

N = 2000


@pytest.mark.timeout(120)
def test_two_thousand_concurrent_sdk_calls() -> None:
    # Client and server sockets of this one process: 2 x N descriptors and some spare.
    if raise_open_files_limit(4 * N + 1024) < 2 * N + 256:
        pytest.skip("RLIMIT_NOFILE too low for 2,000 loopback connections")

    async def scenario() -> tuple[list[Any], dict[str, Any], float]:
        server = await start_fake_claude(FakeClaudeConfig(latency_ms=1000))
        # The aiohttp transport caps connections at `max_connections` (100 if unset).
        http_client = anthropic.DefaultAioHttpClient(
            limits=httpx2.Limits(max_connections=N + 100, max_keepalive_connections=N + 100)
        )
        try:
            async with anthropic.AsyncAnthropic(
                base_url=server.base_url, api_key="sk-load", max_retries=0, http_client=http_client
            ) as claude:
                started = time.perf_counter()
                results = await asyncio.gather(
                    *(
                        claude.messages.create(
                            model="claude-haiku-5-5",
                            max_tokens=64,
                            messages=[{"role": "user", "content": f"task {i}"}],
                        )
                        for i in range(N)
                    ),
                    return_exceptions=True,
                )
                elapsed = time.perf_counter() - started
            return results, server.stats(), elapsed
        finally:
            await server.aclose()

    results, stats, elapsed = asyncio.run(scenario())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [], f"{len(errors)} errors, e.g. {errors[:3]!r}"
    assert stats["by_status"] == {"200": N}
    assert stats["distinct_requests"] == N and stats["max_calls_per_request"] == 1
    assert stats["inflight_max"] >= N
    assert elapsed < 60
