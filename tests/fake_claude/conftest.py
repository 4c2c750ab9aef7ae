"""Fixtures for the fake Claude tests: a server per test on its own thread, real SDK clients."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import pytest

from pipeline.fake_claude import FakeClaudeConfig, FakeClaudeServer, run_fake_claude_in_thread

StartFake = Callable[..., FakeClaudeServer]


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK falls back to these; a test must see only the credentials it passes."""
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def start_fake() -> Iterator[StartFake]:
    """`start_fake(**config_fields)` runs a fake in a thread until the test ends."""
    with contextlib.ExitStack() as stack:

        def start(**fields: Any) -> FakeClaudeServer:
            return stack.enter_context(run_fake_claude_in_thread(FakeClaudeConfig(**fields)))

        yield start


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
