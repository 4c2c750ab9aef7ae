"""The aiohttp application: Anthropic's /v1/messages, /v1/messages/count_tokens and Message
Batches (/v1/messages/batches...), plus /_fake/*.

A request goes through: auth, body validation, injected 529/500, rate limits (prompt-cache
aware), latency, then a deterministic reply (streamed ones may fail halfway on purpose).
Everything runs on one event loop, so the state needs no locks, and nothing is logged per
request so thousands of calls stay cheap.

Admin: GET /_fake/health, GET and POST /_fake/config (a JSON patch of `FakeClaudeConfig`),
GET /_fake/stats, GET /_fake/requests (the recorded bodies, see `record_requests`),
POST /_fake/reset.

Batches (see `batches`) take the same auth, no rate limit of /v1/messages, and end on the
injectable clock; their calls are counted under the stats' "batches", not in `by_status`.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from .batches import LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, BatchStore, NotFound, parse_create_body
from .cache import PromptCache
from .config import FakeClaudeConfig, patched
from .limits import RateLimiter, model_family
from .params import InvalidRequest
from .prompt import parse_request
from .reply import billed_usage, build_reply, message_object
from .stats import FakeStats
from .streaming import STREAM_CUT, STREAM_ERROR, stream_message

_encode = msgspec.json.encode
_decode = msgspec.json.decode
#: aiohttp's own cap; the configured `max_body_bytes` is checked per request so it can change.
_HARD_BODY_CAP = 1 << 30
#: A batch's results file is written in chunks of about this many bytes.
_RESULTS_CHUNK = 1 << 16


def error_response(
    status: int,
    error_type: str,
    message: str,
    request_id: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """Anthropic's error shape, with the `request-id` header the SDK reads."""
    body = {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": request_id,
    }
    out = {"request-id": request_id}
    if headers:
        out.update(headers)
    return web.Response(
        status=status, body=_encode(body), headers=out, content_type="application/json"
    )


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=_encode(data), headers=headers, content_type="application/json"
    )


def api_key_of(request: web.Request) -> str | None:
    """The key from `x-api-key`, else from `Authorization: Bearer`."""
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


def peer_of(request: web.Request) -> str | None:
    """The client's address as `host:port` (None when the transport does not say)."""
    transport = request.transport
    peername = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return None


class FakeClaudeApp:
    """State and handlers of one fake server; `clock`/`wall` are injectable for tests."""

    def __init__(
        self,
        config: FakeClaudeConfig,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.stats = FakeStats(config.record_requests)
        self.limiter = RateLimiter(config, clock, wall)
        self.cache = PromptCache(clock)
        self._seed(config.seed)
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(3)
        self.batches = BatchStore(self.stats, self.cache, clock, wall, self._next_ids)
        app = web.Application(client_max_size=_HARD_BODY_CAP)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        batches, batch = "/v1/messages/batches", "/v1/messages/batches/{batch_id}"
        app.router.add_post(batches, self._batch_create)
        app.router.add_get(batches, self._batch_list)
        app.router.add_get(batch, self._batch_retrieve)
        app.router.add_delete(batch, self._batch_delete)
        app.router.add_post(batch + "/cancel", self._batch_cancel)
        app.router.add_get(batch + "/results", self._batch_results)
        app.router.add_get("/_fake/health", self._health)
        app.router.add_get("/_fake/config", self._get_config)
        app.router.add_post("/_fake/config", self._post_config)
        app.router.add_get("/_fake/stats", self._get_stats)
        app.router.add_get("/_fake/requests", self._get_requests)
        app.router.add_post("/_fake/reset", self._post_reset)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self.app = app

    def _seed(self, seed: int) -> None:
        self._fault_rng = random.Random(f"{seed}:faults")
        self._latency_rng = random.Random(f"{seed}:latency")
        self._stream_rng = random.Random(f"{seed}:stream-faults")

    def set_config(self, config: FakeClaudeConfig) -> None:
        """Swap settings at runtime; a new seed restarts both random streams."""
        if config.seed != self.config.seed:
            self._seed(config.seed)
        self.limiter.configure(config)
        self.stats.keep_requests(config.record_requests)
        self.config = config

    def update_config(self, patch: dict[str, Any]) -> FakeClaudeConfig:
        self.set_config(patched(self.config, patch))
        return self.config

    def reset(
        self,
        *,
        stats: bool = True,
        rate_limits: bool = False,
        cache: bool = False,
        batches: bool = False,
    ) -> None:
        if stats:
            self.batches.advance(self.config)  # a batch due before the reset counts before it
            self.stats.reset()
        if rate_limits:
            self.limiter.clear()
        if cache:
            self.cache.clear()
        if batches:
            self.batches.clear()

    def snapshot(self) -> dict[str, Any]:
        """The stats, with every batch due by now ended (and counted) first."""
        self.batches.advance(self.config)
        return self.stats.snapshot()

    def _next_ids(self) -> tuple[str, str]:
        n = next(self._ids)
        tail = f"{self._id_prefix}{n:012x}"
        return f"req_fake{tail}", f"msg_fake{tail}"

    def latency_s(self, config: FakeClaudeConfig) -> float:
        """Fixed, or lognormal around the median `latency_ms`, capped."""
        if config.latency_ms <= 0:
            return 0.0
        ms = config.latency_ms
        if config.latency_sigma > 0:
            ms = self._latency_rng.lognormvariate(math.log(ms), config.latency_sigma)
        if config.latency_cap_ms is not None:
            ms = min(ms, config.latency_cap_ms)
        return ms / 1000.0

    # -- /v1 -------------------------------------------------------------------------------

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        peer, began = peer_of(request), time.time()
        self.stats.begin(peer)
        status, key_family = 500, None
        try:
            response, key_family = await self._handle_messages(request, peer, began)
            status = response.status
            return response
        finally:
            self.stats.end(status, key_family, peer)

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        self.stats.begin()
        status = 500
        try:
            request_id, _ = self._next_ids()
            response = self._authenticate(request, request_id)
            if response is None:
                raw_or_error = await self._read_body(request, request_id)
                if isinstance(raw_or_error, web.Response):
                    response = raw_or_error
                else:
                    try:
                        parsed = parse_request(raw_or_error, count_only=True)
                    except InvalidRequest as exc:
                        response = error_response(
                            400, "invalid_request_error", str(exc), request_id
                        )
                    else:
                        response = _json(
                            {"input_tokens": parsed.input_tokens},
                            headers={"request-id": request_id},
                        )
            status = response.status
            return response
        finally:
            self.stats.end(status, None)

    def _authenticate(self, request: web.Request, request_id: str) -> web.Response | None:
        key = api_key_of(request)
        if key is None:
            return error_response(
                401, "authentication_error", "x-api-key header is required", request_id
            )
        if key in self.config.bad_keys:
            return error_response(401, "authentication_error", "invalid x-api-key", request_id)
        if key in self.config.forbidden_keys:
            return error_response(
                403,
                "permission_error",
                "Your API key does not have permission to use the specified resource.",
                request_id,
            )
        return None

    async def _read_body(
        self, request: web.Request, request_id: str, limit: int | None = None
    ) -> bytes | web.Response:
        limit = self.config.max_body_bytes if limit is None else limit
        too_large = error_response(
            413,
            "request_too_large",
            f"Request exceeds the maximum size of {limit} bytes.",
            request_id,
        )
        if request.content_length is not None and request.content_length > limit:
            return too_large
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return too_large
        return too_large if len(raw) > limit else raw

    async def _handle_messages(
        self, request: web.Request, peer: str | None = None, began: float | None = None
    ) -> tuple[web.StreamResponse, str | None]:
        config = self.config
        request_id, message_id = self._next_ids()
        denied = self._authenticate(request, request_id)
        if denied is not None:
            return denied, None
        api_key = api_key_of(request) or ""
        raw = await self._read_body(request, request_id)
        if isinstance(raw, web.Response):
            return raw, None
        try:
            parsed = parse_request(raw)
        except InvalidRequest as exc:
            return error_response(400, "invalid_request_error", str(exc), request_id), None
        self.stats.received(parsed.fields, raw)
        family = model_family(parsed.model)
        key_family = f"{api_key}|{family}"

        if config.overloaded_rate or config.server_error_rate:
            roll = self._fault_rng.random()
            if roll < config.overloaded_rate:
                return error_response(529, "overloaded_error", "Overloaded", request_id), key_family
            if roll < config.overloaded_rate + config.server_error_rate:
                return error_response(
                    500, "api_error", "Internal server error", request_id
                ), key_family

        plan = self.cache.plan(api_key, parsed, config.cache_ttl_s, config.cache_min_tokens)
        admission = self.limiter.admit(
            api_key, family, plan.uncached_input_tokens, parsed.max_tokens
        )
        if not admission.ok:
            headers = dict(admission.headers)
            headers["retry-after"] = str(max(1, math.ceil(admission.retry_after_s)))
            return error_response(
                429, "rate_limit_error", admission.message, request_id, headers
            ), key_family
        self.cache.commit(plan)

        delay = self.latency_s(config)
        if delay > 0:
            await asyncio.sleep(delay)

        reply = build_reply(
            parsed.key,
            parsed.generation,
            parsed.max_tokens,
            config.min_output_tokens,
            config.max_output_tokens,
        )
        headers = self.limiter.settle(api_key, family, parsed.max_tokens, reply.output_tokens)
        headers["request-id"] = request_id
        usage = billed_usage(plan, reply.output_tokens)
        fault = self._stream_fault(config) if parsed.stream else None
        if fault is None:
            transport = request.transport
            self.stats.success(
                parsed.key,
                parsed.user_id,
                key_family,
                usage,
                client_gone=transport is None or transport.is_closing(),
                model=parsed.model,
                prompt=parsed.last_user_text,
                peer=peer,
                began=began,
            )
        else:
            self.stats.stream_failed(cut=fault == STREAM_CUT)
        message = message_object(message_id, parsed.model, reply, plan, "standard")
        if parsed.stream:
            return await stream_message(request, message, headers, fault), key_family
        return _json(message, headers=headers), key_family

    def _stream_fault(self, config: FakeClaudeConfig) -> str | None:
        """Whether this streamed reply fails halfway, and how (its own seeded stream)."""
        if not (config.stream_error_rate or config.stream_cut_rate):
            return None
        roll = self._stream_rng.random()
        if roll < config.stream_error_rate:
            return STREAM_ERROR
        if roll < config.stream_error_rate + config.stream_cut_rate:
            return STREAM_CUT
        return None

    # -- /v1/messages/batches --------------------------------------------------------------

    async def _batch_call(
        self,
        name: str,
        request: web.Request,
        handle: Callable[[web.Request, str], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Auth, then the batches brought up to date, then `handle`; counted by name+status."""
        request_id, _ = self._next_ids()
        status = 500
        try:
            response: web.StreamResponse | None = self._authenticate(request, request_id)
            if response is None:
                self.batches.advance(self.config)
                try:
                    response = await handle(request, request_id)
                except InvalidRequest as exc:
                    response = error_response(400, "invalid_request_error", str(exc), request_id)
                except NotFound as exc:
                    response = error_response(
                        404,
                        "not_found_error",
                        f"Message batch {exc.args[0]!r} not found",
                        request_id,
                    )
            status = response.status
            return response
        finally:
            self.stats.batches.calls[f"{name} {status}"] += 1

    async def _batch_create(self, request: web.Request) -> web.StreamResponse:
        return await self._batch_call("create", request, self._create_batch)

    async def _batch_list(self, request: web.Request) -> web.StreamResponse:
        return await self._batch_call("list", request, self._list_batches)

    async def _batch_retrieve(self, request: web.Request) -> web.StreamResponse:
        return await self._batch_call("retrieve", request, self._retrieve_batch)

    async def _batch_cancel(self, request: web.Request) -> web.StreamResponse:
        return await self._batch_call("cancel", request, self._cancel_batch)

    async def _batch_delete(self, request: web.Request) -> web.StreamResponse:
        return await self._batch_call("delete", request, self._delete_batch)

    async def _batch_results(self, request: web.Request) -> web.StreamResponse:
        return await self._batch_call("results", request, self._batch_results_file)

    def _batch_json(self, request: web.Request, batch_id: str | None = None) -> dict[str, Any]:
        batch = self.batches.get(batch_id or request.match_info["batch_id"])
        return self.batches.to_json(batch, f"{request.scheme}://{request.host}")

    async def _create_batch(self, request: web.Request, request_id: str) -> web.StreamResponse:
        config = self.config
        raw = await self._read_body(request, request_id, config.batch_max_body_bytes)
        if isinstance(raw, web.Response):
            return raw
        requests = parse_create_body(raw, config)
        limit = config.batch_queue_limit
        queued = self.batches.queued_requests()
        if limit is not None and queued + len(requests) > limit:
            retry_after = max(1, math.ceil(self.batches.next_end(config)))
            return error_response(
                429,
                "rate_limit_error",
                f"This batch of {len(requests)} requests would exceed the limit of {limit} "
                f"batch requests waiting to be processed ({queued} are queued).",
                request_id,
                {"retry-after": str(retry_after)},
            )
        seen = self.stats.batches.params_seen
        for each in requests:
            if each.parsed is not None:
                seen.update(each.parsed.fields)
        batch = self.batches.create(api_key_of(request) or "", requests, config)
        return _json(self._batch_json(request, batch.id), headers={"request-id": request_id})

    async def _retrieve_batch(self, request: web.Request, request_id: str) -> web.StreamResponse:
        return _json(self._batch_json(request), headers={"request-id": request_id})

    async def _list_batches(self, request: web.Request, request_id: str) -> web.StreamResponse:
        query = request.query
        limit = _list_limit(query.get("limit"))
        page, has_more = self.batches.page(query.get("before_id"), query.get("after_id"), limit)
        base_url = f"{request.scheme}://{request.host}"
        return _json(
            {
                "data": [self.batches.to_json(batch, base_url) for batch in page],
                "has_more": has_more,
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
            },
            headers={"request-id": request_id},
        )

    async def _cancel_batch(self, request: web.Request, request_id: str) -> web.StreamResponse:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch.status == "ended":
            raise InvalidRequest(
                f"Message batch {batch.id!r} has already ended and cannot be canceled."
            )
        self.batches.cancel(batch)
        return _json(self._batch_json(request), headers={"request-id": request_id})

    async def _delete_batch(self, request: web.Request, request_id: str) -> web.StreamResponse:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch.status != "ended":
            raise InvalidRequest(
                f"Message batch {batch.id!r} is {batch.status} and cannot be deleted until "
                "processing has ended; cancel it first."
            )
        self.batches.delete(batch)
        return _json(
            {"id": batch.id, "type": "message_batch_deleted"}, headers={"request-id": request_id}
        )

    async def _batch_results_file(
        self, request: web.Request, request_id: str
    ) -> web.StreamResponse:
        """The .jsonl file, written in chunks (a batch may hold 100,000 results)."""
        batch = self.batches.get(request.match_info["batch_id"])
        if batch.lines is None:
            raise InvalidRequest(
                f"Message batch {batch.id!r} is {batch.status}: its results are available "
                "once processing has ended."
            )
        self.stats.batches.results_downloads[batch.id] += 1
        response = web.StreamResponse(
            headers={"request-id": request_id, "content-type": "application/binary"}
        )
        await response.prepare(request)
        chunk: list[bytes] = []
        size = 0
        for line in batch.lines:
            chunk.append(line)
            size += len(line)
            if size >= _RESULTS_CHUNK:
                await response.write(b"".join(chunk))
                chunk, size = [], 0
        if chunk:
            await response.write(b"".join(chunk))
        await response.write_eof()
        return response

    # -- /_fake ----------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return _json({"ok": True})

    async def _get_config(self, request: web.Request) -> web.Response:
        return _json(self.config.to_dict())

    async def _post_config(self, request: web.Request) -> web.Response:
        try:
            patch = _decode(await request.read())
            if not isinstance(patch, dict):
                raise ValueError("the config patch must be a JSON object")
            config = self.update_config(patch)
        except (ValueError, msgspec.DecodeError) as exc:
            return error_response(400, "invalid_request_error", str(exc), "req_fake_admin")
        return _json(config.to_dict())

    async def _get_stats(self, request: web.Request) -> web.Response:
        return _json(self.snapshot())

    async def _get_requests(self, request: web.Request) -> web.Response:
        return _json({"requests": [msgspec.Raw(body) for body in self.stats.recorded()]})

    async def _post_reset(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            options = _decode(raw) if raw.strip() else {}
            if not isinstance(options, dict) or not set(options) <= {
                "stats",
                "rate_limits",
                "cache",
                "batches",
            }:
                raise ValueError(
                    "expected {'stats'?: bool, 'rate_limits'?: bool, 'cache'?: bool, "
                    "'batches'?: bool}"
                )
        except (ValueError, msgspec.DecodeError) as exc:
            return error_response(400, "invalid_request_error", str(exc), "req_fake_admin")
        self.reset(
            stats=bool(options.get("stats", True)),
            rate_limits=bool(options.get("rate_limits", False)),
            cache=bool(options.get("cache", False)),
            batches=bool(options.get("batches", False)),
        )
        return _json({"ok": True})

    async def _not_found(self, request: web.Request) -> web.Response:
        request_id, _ = self._next_ids()
        return error_response(
            404, "not_found_error", f"Not found: {request.method} {request.path}", request_id
        )


def _list_limit(raw: str | None) -> int:
    """The `limit` query parameter of the batch list: 1..1000, 20 when absent."""
    if raw is None:
        return LIST_LIMIT_DEFAULT
    try:
        limit = int(raw)
    except ValueError:
        raise InvalidRequest("limit: Input should be a valid integer") from None
    if limit < 1:
        raise InvalidRequest("limit: Input should be greater than or equal to 1")
    if limit > LIST_LIMIT_MAX:
        raise InvalidRequest(f"limit: Input should be less than or equal to {LIST_LIMIT_MAX}")
    return limit
