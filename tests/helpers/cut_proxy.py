"""A TCP proxy in front of Redis that can cut a client's connection around a transaction's EXEC.

It makes the two failures a producer cannot tell apart from its side, on demand:
  - `cut("after-exec")`: the EXEC reaches Redis, which runs the transaction; the connection is
    then closed before any reply to it comes back (the batch landed, the producer never hears);
  - `cut("before-exec")`: the connection is closed instead of passing the EXEC on, so Redis
    discards the queued transaction (nothing landed, and the producer hears the same error).
It runs on the test's own event loop; each armed cut fires once, on the next EXEC (or on the
next write that holds another command given to `cut`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

Cut = Literal["after-exec", "before-exec"]


class CutProxy:
    """`await CutProxy(redis_url).start()`; connect to `proxy.url` instead of `redis_url`."""

    def __init__(self, redis_url: str, *, landing_s: float = 0.5) -> None:
        self._target = urlsplit(redis_url)
        self._upstream = (self._target.hostname or "127.0.0.1", self._target.port or 6379)
        self._landing_s = landing_s  # how long Redis gets to run the EXEC before the cut
        self._server: asyncio.Server | None = None
        self._armed: Cut | None = None
        self._marker = b""
        self._tasks: set[asyncio.Task[None]] = set()
        self.cuts = 0

    @property
    def url(self) -> str:
        """The Redis URL (credentials, database) with the proxy's address in it."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        creds, at, _ = self._target.netloc.rpartition("@")
        return urlunsplit(self._target._replace(netloc=f"{creds}{at}{host}:{port}"))

    async def start(self) -> CutProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    def cut(self, how: Cut, command: str = "EXEC") -> None:
        """Cut the connection that sends the next `command` (RESP-encoded, so a command name
        in the arguments of another one would match too: do not send one in a test)."""
        self._marker = f"${len(command)}\r\n{command}\r\n".encode()
        self._armed = how

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        replies_on = asyncio.Event()
        replies_on.set()
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        back = asyncio.create_task(self._replies(up_reader, writer, replies_on))
        try:
            tail = b""
            while data := await reader.read(65536):
                seen = tail + data
                tail = seen[-64:]
                if self._armed is None or self._marker not in seen:
                    up_writer.write(data)
                    await up_writer.drain()
                    continue
                how, self._armed = self._armed, None
                self.cuts += 1
                replies_on.clear()  # the client hears nothing from here on
                if how == "after-exec":
                    up_writer.write(data)
                    await up_writer.drain()
                    await asyncio.sleep(self._landing_s)
                break  # before-exec: the EXEC never leaves
        except (ConnectionError, OSError):
            pass
        finally:
            back.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await back
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await w.wait_closed()
            self._tasks.discard(task)

    @staticmethod
    async def _replies(
        up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter, on: asyncio.Event
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await up_reader.read(65536):
                if on.is_set():
                    writer.write(data)
                    await writer.drain()
