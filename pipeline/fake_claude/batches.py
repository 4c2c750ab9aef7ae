"""The Message Batches API: check a create body, run batches on the fake's clock, page them.

Nothing runs in the background. A batch's state follows from the clock whenever it is looked
at (`advance`): it does its requests one by one over `batch_processing_s`, in a shuffled
order that is also the order of its results file, and the first look after its end makes its
results once (replies, prompt cache, stats) and keeps them. A cancel keeps the results of the
requests done by then; the others are `canceled`.

As the API does, a create call checks the shape of `requests` (400 for the whole call) but
each request's `params` only when the request is processed: an invalid one becomes an
`errored` result with an invalid_request_error (unless `batch_validate_at_create`).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from .cache import PromptCache
from .config import FakeClaudeConfig
from .params import InvalidRequest
from .prompt import ParsedRequest, parse_body
from .reply import build_reply, message_object
from .stats import RESULT_TYPES, FakeStats

#: A batch expires (its unprocessed requests `expired`) this long after its creation.
EXPIRY_S = 24 * 3600.0
CUSTOM_ID_PATTERN = "^[a-zA-Z0-9_-]{1,64}$"
_CUSTOM_ID = re.compile(CUSTOM_ID_PATTERN)
_REQUEST_KEYS = frozenset({"custom_id", "params"})
LIST_LIMIT_DEFAULT = 20
LIST_LIMIT_MAX = 1000

_encode = msgspec.json.encode
_decode = msgspec.json.Decoder().decode


class NotFound(LookupError):
    """No live batch has that id (never created, or deleted)."""


@dataclass(slots=True)
class BatchRequest:
    """One request of a batch: its params parsed, or why they are invalid."""

    custom_id: str
    parsed: ParsedRequest | None
    error: str | None = None


@dataclass(slots=True, eq=False)
class Batch:
    """A batch and, once it has ended, its results file (one JSON line per request)."""

    id: str
    seq: int
    api_key: str
    requests: list[BatchRequest]
    order: list[int]  # processing order, which is also the results order
    created: float  # on the fake's clock
    created_wall: float
    cancel_at: float | None = None
    cancel_wall: float | None = None
    ended: float | None = None
    lines: list[bytes] | None = None
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def status(self) -> str:
        if self.lines is not None:
            return "ended"
        return "in_progress" if self.cancel_at is None else "canceling"

    def wall(self, clock_time: float) -> float:
        return self.created_wall + (clock_time - self.created)


def rfc3339(epoch_s: float) -> str:
    """The API's timestamps: UTC with microseconds."""
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_create_body(raw: bytes, config: FakeClaudeConfig) -> list[BatchRequest]:
    """The requests of a create call; `InvalidRequest` (a 400) when the call is refused."""
    try:
        body = _decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"There was an error parsing the body of your request: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    for name in body:
        if name != "requests":
            raise InvalidRequest(f"{name}: Extra inputs are not permitted")
    items = body.get("requests")
    if items is None:
        raise InvalidRequest("requests: Field required")
    if not isinstance(items, list):
        raise InvalidRequest("requests: Input should be a valid list")
    if not items:
        raise InvalidRequest("requests: List should have at least 1 item after validation, not 0")
    if len(items) > config.batch_max_requests:
        raise InvalidRequest(
            f"requests: List should have at most {config.batch_max_requests} items after "
            f"validation, not {len(items)}"
        )
    seen: dict[str, int] = {}
    out: list[BatchRequest] = []
    for i, item in enumerate(items):
        custom_id, params = _request_shape(item, f"requests.{i}")
        first = seen.setdefault(custom_id, i)
        if first != i:
            raise InvalidRequest(
                f"requests.{i}.custom_id: Duplicate custom_id '{custom_id}' (also "
                f"requests.{first}.custom_id); custom_id must be unique within a batch"
            )
        try:
            out.append(BatchRequest(custom_id, check_params(params)))
        except InvalidRequest as exc:
            if config.batch_validate_at_create:
                raise InvalidRequest(_located(f"requests.{i}.params", str(exc))) from exc
            out.append(BatchRequest(custom_id, None, str(exc)))
    return out


def _request_shape(item: object, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where}: Input should be a valid dictionary")
    for name in item:
        if name not in _REQUEST_KEYS:
            raise InvalidRequest(f"{where}.{name}: Extra inputs are not permitted")
    custom_id = item.get("custom_id")
    if custom_id is None:
        raise InvalidRequest(f"{where}.custom_id: Field required")
    if not isinstance(custom_id, str):
        raise InvalidRequest(f"{where}.custom_id: Input should be a valid string")
    if not custom_id:
        raise InvalidRequest(f"{where}.custom_id: String should have at least 1 character")
    if len(custom_id) > 64:
        raise InvalidRequest(f"{where}.custom_id: String should have at most 64 characters")
    if not _CUSTOM_ID.match(custom_id):
        raise InvalidRequest(
            f"{where}.custom_id: String should match pattern '{CUSTOM_ID_PATTERN}'"
        )
    params = item.get("params")
    if params is None:
        raise InvalidRequest(f"{where}.params: Field required")
    if not isinstance(params, dict):
        raise InvalidRequest(f"{where}.params: Input should be a valid dictionary")
    return custom_id, params


def check_params(params: dict[str, Any]) -> ParsedRequest:
    """A request's params checked as /v1/messages checks a body, less what a batch refuses:
    `stream: true` and `speed` (fast mode); `max_tokens` 0 is refused by both."""
    parsed = parse_body(params)
    if parsed.stream:
        raise InvalidRequest("stream: Input should be False (a batch does not stream)")
    if params.get("speed") is not None:
        raise InvalidRequest("speed: fast mode is not supported in a message batch")
    return parsed


def _located(where: str, message: str) -> str:
    """`max_tokens: Field required` under `requests.3.params` -> `requests.3.params.max_tokens:
    Field required`; a message that names no field gets the location as a prefix."""
    head, sep, _ = message.partition(": ")
    if sep and re.fullmatch(r"[a-z_][a-z0-9_.]*", head):
        return f"{where}.{message}"
    return f"{where}: {message}"


class BatchStore:
    """The batches of one server, newest last; mutated only on its event loop."""

    def __init__(
        self,
        stats: FakeStats,
        cache: PromptCache,
        clock: Callable[[], float],
        wall: Callable[[], float],
        next_ids: Callable[[], tuple[str, str]],
    ) -> None:
        self._stats = stats
        self._cache = cache
        self._clock = clock
        self._wall = wall
        self._next_ids = next_ids
        self._batches: dict[str, Batch] = {}
        self._live: dict[str, Batch] = {}  # not ended yet
        self._seq = 0

    def clear(self) -> None:
        """Forget every batch (ended or not)."""
        self._batches.clear()
        self._live.clear()

    def __len__(self) -> int:
        return len(self._batches)

    def queued_requests(self) -> int:
        """Requests of the batches not ended yet (what `batch_queue_limit` caps)."""
        return sum(len(batch.requests) for batch in self._live.values())

    def next_end(self, config: FakeClaudeConfig) -> float:
        """Seconds until the first live batch ends (0 when none is live)."""
        now = self._clock()
        ends = [self._end(batch, config) - now for batch in self._live.values()]
        return max(0.0, min(ends, default=0.0))

    def create(self, api_key: str, requests: list[BatchRequest], config: FakeClaudeConfig) -> Batch:
        self._seq += 1
        request_id, _ = self._next_ids()
        batch_id = "msgbatch_" + request_id.removeprefix("req_")
        order = list(range(len(requests)))
        random.Random(f"{config.seed}:batch-order:{self._seq}").shuffle(order)
        if len(order) > 1 and order == sorted(order):
            order.reverse()  # results are never in request order
        batch = Batch(batch_id, self._seq, api_key, requests, order, self._clock(), self._wall())
        self._batches[batch_id] = batch
        self._live[batch_id] = batch
        stats = self._stats.batches
        stats.batch_created(batch_id, [r.custom_id for r in requests])
        return batch

    def get(self, batch_id: str) -> Batch:
        batch = self._batches.get(batch_id)
        if batch is None:
            raise NotFound(batch_id)
        return batch

    def cancel(self, batch: Batch) -> None:
        """Start cancelling a batch that has not ended (cancelling one twice changes nothing)."""
        if batch.cancel_at is None:
            batch.cancel_at = self._clock()
            batch.cancel_wall = self._wall()
            self._stats.batches.canceled += 1

    def delete(self, batch: Batch) -> None:
        del self._batches[batch.id]
        self._live.pop(batch.id, None)
        self._stats.batches.deleted += 1

    def page(
        self, before_id: str | None, after_id: str | None, limit: int
    ) -> tuple[list[Batch], bool]:
        """Newest first, `limit` of them next to the cursor, and whether more lie beyond."""
        if before_id is not None and after_id is not None:
            raise InvalidRequest("Cannot specify both before_id and after_id.")
        newest_first = list(reversed(self._batches.values()))
        ids = [batch.id for batch in newest_first]
        if before_id is not None:
            stop = _index(ids, before_id, "before_id")
            start = max(0, stop - limit)
            return newest_first[start:stop], start > 0
        start = 0 if after_id is None else _index(ids, after_id, "after_id") + 1
        return newest_first[start : start + limit], len(ids) > start + limit

    # -- time ------------------------------------------------------------------------------

    def _end(self, batch: Batch, config: FakeClaudeConfig) -> float:
        end = batch.created + min(config.batch_processing_s, EXPIRY_S)
        if batch.cancel_at is not None:
            end = min(end, batch.cancel_at + config.batch_cancel_s)
        return end

    def advance(self, config: FakeClaudeConfig) -> None:
        """End every live batch whose time has come, oldest first."""
        if not self._live:
            return
        now = self._clock()
        for batch in list(self._live.values()):
            end = self._end(batch, config)
            if now >= end:
                self._finish(batch, end, config)
                del self._live[batch.id]

    def _finish(self, batch: Batch, end: float, config: FakeClaudeConfig) -> None:
        """Make the results file: each request in processing order, done at its share of
        the processing time unless the batch was cancelled (or expired) before that."""
        stats = self._stats.batches
        rng = random.Random(f"{config.seed}:batch-results:{batch.seq}")
        n = len(batch.requests)
        expires = batch.created + EXPIRY_S
        error_rate, expire_rate = config.batch_error_rate, config.batch_expire_rate
        lines: list[bytes] = []
        for k, index in enumerate(batch.order):
            request = batch.requests[index]
            roll = rng.random()
            done_at = batch.created + (k + 1) / n * config.batch_processing_s
            usage: dict[str, int] = {}
            key: str | None = None
            result: dict[str, Any]
            if batch.cancel_at is not None and done_at > batch.cancel_at:
                result = {"type": "canceled"}
            elif done_at > expires or error_rate <= roll < error_rate + expire_rate:
                result = {"type": "expired"}
            elif request.parsed is None:
                result = _errored("invalid_request_error", request.error or "Invalid request")
            elif roll < error_rate:
                result = _errored("api_error", "Internal server error")
            else:
                parsed = request.parsed
                result = {"type": "succeeded", "message": self._message(batch, parsed, config)}
                usage = result["message"]["usage"]
                key = parsed.key
            batch.counts[result["type"]] += 1
            stats.result(batch.id, result["type"], key, usage)
            lines.append(_encode({"custom_id": request.custom_id, "result": result}) + b"\n")
        batch.lines = lines
        batch.ended = end
        batch.requests = []  # the parsed params are no longer needed
        stats.ended += 1

    def _message(
        self, batch: Batch, parsed: ParsedRequest, config: FakeClaudeConfig
    ) -> dict[str, Any]:
        """What /v1/messages would answer, billed at the batch tier."""
        plan = self._cache.plan(batch.api_key, parsed, config.cache_ttl_s, config.cache_min_tokens)
        self._cache.commit(plan)
        reply = build_reply(
            parsed.key,
            parsed.generation,
            parsed.max_tokens,
            config.min_output_tokens,
            config.max_output_tokens,
        )
        _, message_id = self._next_ids()
        return message_object(message_id, parsed.model, reply, plan, "batch")

    # -- JSON ------------------------------------------------------------------------------

    def to_json(self, batch: Batch, base_url: str) -> dict[str, Any]:
        """The `message_batch` object; `base_url` makes an absolute `results_url`."""
        ended = batch.status == "ended"
        counts = {name: batch.counts[name] for name in RESULT_TYPES}
        processing = 0 if ended else len(batch.requests)
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": batch.status,
            "request_counts": {"processing": processing, **counts},
            "ended_at": None if batch.ended is None else rfc3339(batch.wall(batch.ended)),
            "created_at": rfc3339(batch.created_wall),
            "expires_at": rfc3339(batch.created_wall + EXPIRY_S),
            "archived_at": None,
            "cancel_initiated_at": None
            if batch.cancel_wall is None
            else rfc3339(batch.cancel_wall),
            "results_url": f"{base_url}/v1/messages/batches/{batch.id}/results" if ended else None,
        }


def _errored(error_type: str, message: str) -> dict[str, Any]:
    return {
        "type": "errored",
        "error": {"type": "error", "error": {"type": error_type, "message": message}},
    }


def _index(ids: list[str], batch_id: str, name: str) -> int:
    try:
        return ids.index(batch_id)
    except ValueError:
        raise InvalidRequest(f"{name}: no message batch with id {batch_id!r}") from None
