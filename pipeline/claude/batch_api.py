"""The Message Batches adapter: the only module besides `api.py` that imports `anthropic`.

Loaded only by the batch lane (`pipeline.claude.batch_lane`). It speaks the Batches API in the
pipeline's terms: create a batch of requests, look one up, list recent ones, cancel, and read
the results line by line (JSONL, never the whole file in memory), each as the raw message JSON
`pipeline.claude.api` decodes for plain calls, so a batched answer is the same Answer.
SDK errors map onto the pipeline's tree as for plain calls (`api.map_error`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import anthropic
import msgspec

from pipeline.claude.api import map_error
from pipeline.runtime.errors import PermanentError

log = logging.getLogger(__name__)

__all__ = [
    "BatchInfo", "BatchLine", "CreateRefused", "cancel", "create", "recent", "results", "retrieve",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """What the lane needs of a batch object."""

    id: str
    processing_status: str  # in_progress, canceling, ended
    created_at: float  # seconds since the epoch
    requests: int  # all its requests, whatever their state


class _Error(msgspec.Struct):
    type: str = "error"
    message: str = ""


class _ErrorBody(msgspec.Struct):
    error: _Error = msgspec.field(default_factory=_Error)


_NULL = msgspec.Raw(b"null")


class _Result(msgspec.Struct):
    type: str
    message: msgspec.Raw = _NULL  # (msgspec takes no Raw | None)
    error: _ErrorBody | None = None


class BatchLine(msgspec.Struct):
    """One line of a batch's results: its custom_id, and how the request ended (`succeeded`
    with the message JSON, `errored` with the error, `canceled`, `expired`)."""

    custom_id: str
    result: _Result

    @property
    def kind(self) -> str:
        return self.result.type

    @property
    def message(self) -> bytes | None:
        """A succeeded request's message, as JSON."""
        raw = bytes(self.result.message)
        return None if raw == b"null" else raw

    @property
    def error_type(self) -> str:
        return self.result.error.error.type if self.result.error else ""

    @property
    def error_message(self) -> str:
        return self.result.error.error.message[:300] if self.result.error else ""


_decode_line = msgspec.json.Decoder(BatchLine).decode


class CreateRefused(Exception):
    """The API refused a create (a 4xx: no batch was made, unlike after a timeout, a lost
    connection or a 5xx, after which one may have been). `permanent`: it would refuse it
    again (a 400, 413…), unlike a 429 or 409."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


async def create(
    client: anthropic.AsyncAnthropic, requests: Sequence[dict[str, Any]], auth_pause_s: float
) -> BatchInfo:
    """Create a batch of `requests` (`{"custom_id", "params"}` each).

    Raises:
        CreateRefused: the API said no (its status and message in the text).
        the pipeline's error tree (`api.map_error`) otherwise: a batch may have been made.
    """
    try:
        batch = await client.messages.batches.create(requests=list(requests))  # type: ignore[arg-type]
    except anthropic.APIStatusError as exc:
        error = map_error(exc, auth_pause_s)
        if exc.status_code >= 500:  # it may have made the batch before failing
            raise error from None
        raise CreateRefused(str(error), permanent=isinstance(error, PermanentError)) from None
    except anthropic.AnthropicError as exc:
        raise map_error(exc, auth_pause_s) from None
    return _info(batch)


@contextlib.contextmanager
def _mapped(auth_pause_s: float) -> Iterator[None]:
    """SDK errors raised as the pipeline's (`api.map_error`)."""
    try:
        yield
    except anthropic.AnthropicError as exc:
        raise map_error(exc, auth_pause_s) from None


async def retrieve(
    client: anthropic.AsyncAnthropic, batch_id: str, auth_pause_s: float
) -> BatchInfo:
    with _mapped(auth_pause_s):
        return _info(await client.messages.batches.retrieve(batch_id))


async def cancel(client: anthropic.AsyncAnthropic, batch_id: str, auth_pause_s: float) -> None:
    with _mapped(auth_pause_s):
        await client.messages.batches.cancel(batch_id)


async def recent(
    client: anthropic.AsyncAnthropic, since: float, auth_pause_s: float
) -> AsyncGenerator[BatchInfo, None]:
    """The batches created at or after `since` (epoch seconds), newest first."""
    with _mapped(auth_pause_s):
        async for batch in client.messages.batches.list(limit=100):
            info = _info(batch)
            if info.created_at < since:
                return
            yield info


async def results(
    client: anthropic.AsyncAnthropic, batch_id: str, auth_pause_s: float
) -> AsyncGenerator[BatchLine, None]:
    """An ended batch's results, one line at a time (not in request order)."""
    with _mapped(auth_pause_s):
        stream = client.messages.batches.with_streaming_response.results(batch_id)
        async with stream as response:
            async for line in response.iter_lines():
                if not line.strip():
                    continue
                try:
                    decoded = _decode_line(line)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    # Its task gets no line: the lane sends it to the standard lane.
                    log.warning("batch %s: an unreadable result line skipped (%s)", batch_id, exc)
                    continue
                yield decoded


def _info(batch: Any) -> BatchInfo:
    counts = batch.request_counts
    total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
    return BatchInfo(
        id=batch.id,
        processing_status=batch.processing_status,
        created_at=batch.created_at.timestamp(),
        requests=total,
    )
