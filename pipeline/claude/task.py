"""The bodies the four stages hand each other (msgspec, inside the versioned envelope).

cache-check -> router: `Request` (with its routing decision); router -> claude-call: `Routed`;
claude-call -> store and cache-check (hit) -> store: `Answer`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from pipeline.claude.content import blocks_json


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """A routing decision (`pipeline.claude.routing.route`): where and how a request is sent.

    A msgspec struct, not a dataclass, because cache-check hands it to the router inside the
    request (`Request.decision`)."""

    family: str  # the call lane (rate limits are per family)
    model: str  # the model id sent to the API
    max_tokens: int  # after the task type's cap


class Request(msgspec.Struct, frozen=True, kw_only=True):
    """A validated, normalised task: what the producer asked for."""

    messages: list[dict[str, Any]]  # Anthropic Messages format
    system: str | list[dict[str, Any]] | None = None
    model: str = "auto"  # as given: "auto", a family alias, or a full model id
    max_tokens: int | None = None  # None: the router decides (config default, type cap)
    temperature: float | None = None
    type: str = "default"
    cache: bool = True
    batch: bool | None = None  # True/False: the producer's say on the batch lane; None: by type
    deadline_s: int | None = None  # the answer is needed within this many seconds
    metadata: str = "{}"  # JSON object text, returned with the result
    #: Messages parameters sent as they are (tools, thinking, stop_sequences, `params`…),
    #: checked by `pipeline.claude.params`; part of the cache key.
    params: dict[str, Any] = {}
    request_hash: str = ""  # canonical hash of what determines the answer (cache key)
    #: The routing decision `request_hash` was computed from, made once by cache-check
    #: (`parse_request`) and applied by the router, so the cache key and the lane never
    #: disagree. None: the model names no configured family (the router fails the task).
    #: UNSET: not decided (a producer's request being validated) or no longer carried (past
    #: the router, where `Routed` holds it). UNSET is left out of the encoding, so entries
    #: after the router, task records and cache entries are byte for byte as before; an
    #: entry from a release that carried no decision still decodes (the router then decides
    #: for it), and an older router ignores the field.
    decision: Route | UnsetType | None = UNSET


class Routed(msgspec.Struct, frozen=True, kw_only=True):
    """A request with its model decided."""

    request: Request
    family: str  # the call stream (lane): a configured family (claude.models)
    model: str  # the full model id sent to the API
    max_tokens: int

    def body(self) -> dict[str, Any]:
        """The Messages request body this task sends, plain call or batch alike: one
        definition, so the two lanes never send different requests under one cache key."""
        request = self.request
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "messages": request.messages,
            **request.params,
        }
        if request.system is not None:
            body["system"] = request.system
        if request.temperature is not None:
            body["temperature"] = request.temperature
        return body

    @classmethod
    def applying(cls, request: Request, decision: Route) -> Routed:
        """`request` sent as `decision` says; from here the decision lives in these fields
        alone (the request's copy is dropped, so a later re-route cannot leave a stale one)."""
        return cls(
            request=msgspec.structs.replace(request, decision=UNSET),
            family=decision.family,
            model=decision.model,
            max_tokens=decision.max_tokens,
        )


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """The API's usage fields. `cache_creation_input_tokens` is the total of both cache-write
    TTLs; `cache_creation_1h_input_tokens` is the part written with the 1-hour TTL (billed
    at 2x input rather than 1.25x)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0
    #: Server tool uses (web search, web fetch…) the call made: their answers are of their
    #: moment, so not cached.
    server_tool_requests: int = 0
    #: Answered through the Message Batches API (`service_tier: batch`): billed at its rates.
    batch: bool = False


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    """Claude's reply (fresh or from the cache), on its way to the store."""

    request: Request
    model: str
    output: str  # the text of the answer's text blocks, joined
    stop_reason: str
    usage: Usage = Usage()
    #: The API's content array as JSON text; "" for one plain text block (the output), which
    #: it would only repeat (`pipeline.claude.content`).
    content: str = ""
    stop_sequence: str | None = None
    api_usage: str = ""  # the API's usage object as JSON text, whole
    message_id: str = ""  # the API's message id (`msg_…`)
    request_id: str = ""  # the API's `request-id` header
    cached: bool = False  # served without a call of its own: from the cache, or coalesced
    coalesced: bool = False  # the answer of an identical request in flight at the same time
    attempts: int = 0  # Claude calls made for this task (0 on a cache hit)
    call_ms: int = 0  # time spent in the Claude call itself

    def blocks_json(self) -> str:
        """The answer's full content array, as JSON text."""
        return blocks_json(self.content, self.output)

    def usage_json(self) -> str:
        """The API's usage object as JSON text (rebuilt from `usage` for an answer recorded
        before the whole object was kept)."""
        if self.api_usage:
            return self.api_usage
        u = self.usage
        api = {
            "input_tokens": u.input_tokens,
            "output_tokens": u.output_tokens,
            "cache_creation_input_tokens": u.cache_creation_input_tokens,
            "cache_read_input_tokens": u.cache_read_input_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": (
                    u.cache_creation_input_tokens - u.cache_creation_1h_input_tokens
                ),
                "ephemeral_1h_input_tokens": u.cache_creation_1h_input_tokens,
            },
        }
        return msgspec.json.encode(api).decode()

    def bare(self) -> Answer:
        """The answer without the request's content (its hash stays): what task records, the
        response cache and flights keep, since whoever reads it brings its own request."""
        return msgspec.structs.replace(
            self, request=Request(messages=[], request_hash=self.request.request_hash)
        )

    def to_store(self) -> Answer:
        """The answer as it travels to the store, which needs the request's type, metadata,
        model and hash but not its content: the store's entry stays small whatever the
        prompt (an entry must fit every stage's `max_entry_bytes`)."""
        if not self.request.messages and self.request.system is None:
            return self
        return msgspec.structs.replace(
            self, request=msgspec.structs.replace(self.request, messages=[], system=None)
        )

    def served_for(self, request: Request, *, coalesced: bool = False) -> Answer:
        """This answer as `request`'s own, served without a call of its own (cache, flight)."""
        return msgspec.structs.replace(
            self, request=request, cached=True, coalesced=coalesced, attempts=0, call_ms=0
        )
