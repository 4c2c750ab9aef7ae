"""Ways to run the fake: on the current loop, in a background thread, or as a CLI process.

The listening socket is set up for floods of connections: a 4096 backlog, no access log, no
handler cancellation (a client hanging up must not hide that the call happened).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import resource
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from .config import FakeClaudeConfig
from .server import FakeClaudeApp

T = TypeVar("T")
BACKLOG = 4096


def raise_open_files_limit(wanted: int = 16_384) -> int:
    """Lift the soft RLIMIT_NOFILE towards `wanted` (never above the hard limit).

    Thousands of concurrent connections need as many descriptors; returns the new soft limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class FakeClaudeServer:
    """A running fake. Its methods may be called from any thread: they hop onto its loop."""

    def __init__(self, state: FakeClaudeApp, runner: web.AppRunner, host: str, port: int) -> None:
        self.state = state
        self.host = host
        self.port = port
        self._runner = runner
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    @property
    def base_url(self) -> str:
        """What to pass as the SDK's `base_url` (no trailing /v1)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def config(self) -> FakeClaudeConfig:
        return self.state.config

    def _on_loop(self, fn: Callable[[], T]) -> T:
        if threading.get_ident() == self._loop_thread:
            return fn()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(call)
        return future.result(timeout=30)

    def stats(self) -> dict[str, Any]:
        """Same JSON as GET /_fake/stats."""
        return self._on_loop(self.state.snapshot)

    def batch_stats(self) -> dict[str, Any]:
        """The Message Batches counters (the stats' "batches"), batches due by now ended."""
        batches: dict[str, Any] = self.stats()["batches"]
        return batches

    def requests(self) -> list[Any]:
        """The recorded request bodies, oldest first (= GET /_fake/requests)."""
        return [msgspec.json.decode(body) for body in self._on_loop(self.state.stats.recorded)]

    def reset(
        self,
        *,
        stats: bool = True,
        rate_limits: bool = False,
        cache: bool = False,
        batches: bool = False,
    ) -> None:
        """Zero the stats (and drop the recorded bodies); optionally refill every rate bucket,
        empty the prompt cache and forget every message batch."""
        self._on_loop(
            lambda: self.state.reset(
                stats=stats, rate_limits=rate_limits, cache=cache, batches=batches
            )
        )

    def update_config(self, **changes: Any) -> FakeClaudeConfig:
        """Patch settings at runtime, e.g. `update_config(bad_keys=[])` (= POST /_fake/config)."""
        return self._on_loop(lambda: self.state.update_config(changes))

    async def aclose(self) -> None:
        """Stop listening and close connections; call it on the server's own loop."""
        await self._runner.cleanup()


async def start_fake_claude(
    config: FakeClaudeConfig | None = None, *, state: FakeClaudeApp | None = None
) -> FakeClaudeServer:
    """Start the fake on the running loop; port 0 picks a free port (see `.port`)."""
    config = config or FakeClaudeConfig()
    state = state or FakeClaudeApp(config)
    raise_open_files_limit()
    runner = web.AppRunner(
        state.app, access_log=None, handler_cancellation=False, shutdown_timeout=1.0
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=BACKLOG)
    await site.start()
    port = int(runner.addresses[0][1])
    return FakeClaudeServer(state, runner, config.host, port)


@contextlib.contextmanager
def run_fake_claude_in_thread(
    config: FakeClaudeConfig | None = None, *, state: FakeClaudeApp | None = None
) -> Iterator[FakeClaudeServer]:
    """Run the fake on its own loop in a daemon thread, for synchronous code and tests;
    `state` brings its own clock (e.g. `FakeClaudeApp(config, clock=...)`)."""
    loop = asyncio.new_event_loop()
    started: concurrent.futures.Future[FakeClaudeServer] = concurrent.futures.Future()

    async def main() -> None:
        try:
            started.set_result(await start_fake_claude(config, state=state))
        except BaseException as exc:
            started.set_exception(exc)
            raise

    def serve() -> None:
        asyncio.set_event_loop(loop)
        with contextlib.suppress(BaseException):
            loop.run_until_complete(main())
        loop.run_forever()

    thread = threading.Thread(target=serve, name="fake-claude", daemon=True)
    thread.start()
    server: FakeClaudeServer | None = None
    try:
        server = started.result(timeout=30)
        yield server
    finally:
        if server is not None:
            asyncio.run_coroutine_threadsafe(server.aclose(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        if not thread.is_alive():
            loop.close()


def run_forever(config: FakeClaudeConfig | None = None, *, use_uvloop: bool = True) -> None:
    """Serve until SIGINT/SIGTERM; prints `fake-claude listening on <url>` once ready.

    Runs on uvloop when it is installed (the `fast` extra) unless `use_uvloop` is False.
    """

    async def main() -> None:
        server = await start_fake_claude(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"fake-claude listening on {server.base_url}", flush=True)
        try:
            await stop.wait()
        finally:
            await server.aclose()

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if use_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
    sys.stdout.flush()
