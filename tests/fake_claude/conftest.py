"""Fixtures for the fake Claude tests: a server per test on its own thread, real SDK clients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import pytest

from pipeline.fake_claude import FakeClaudeServer
from tests.conftest import StartFake


@pytest.fixture
def fake(start_fake: StartFake) -> FakeClaudeServer:
    """A default fake: no latency, no limits, no faults."""
    return start_fake()


MakeClient = Callable[..., Any]


@pytest.fixture
def make_client() -> MakeClient:
    """`make_client(server, api_key=..., **sdk_kwargs)`: a real SDK client with no retries."""

    def make(server: FakeClaudeServer, api_key: str | None = "sk-test", **kwargs: Any) -> Any:
        return anthropic.AsyncAnthropic(
            base_url=server.base_url, api_key=api_key, max_retries=0, **kwargs
        )

    return make
