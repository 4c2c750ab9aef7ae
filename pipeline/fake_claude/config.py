"""Settings of the fake Claude server.

One frozen value: the admin endpoint never mutates it, it builds a new one from a JSON patch
(`patched`) and swaps it in, so a request always sees one consistent set of settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import msgspec

#: Fields a running server cannot change: the socket is already bound.
FIXED_AT_START = frozenset({"host", "port"})


class RateLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Per-minute limits of one model family; None means unlimited."""

    rpm: int | None = None
    itpm: int | None = None
    otpm: int | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "itpm", "otpm"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or null (unlimited), got {value}")


class FakeClaudeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Everything the fake can be told; defaults give a fast, unlimited, error-free server.

    Latency: `latency_ms` is the fixed delay when `latency_sigma` is 0, else the median of a
    lognormal with that sigma; `latency_cap_ms` bounds it (None = no cap).
    Limits: `rpm`/`itpm`/`otpm` apply to every (API key, model family) pair; `family_limits`
    replaces them for the families it names ("haiku", "sonnet", "opus" or a model id).
    Faults: `overloaded_rate`/`server_error_rate` answer a request 529/500 instead;
    `stream_error_rate`/`stream_cut_rate` fail a streamed reply halfway (an overloaded `error`
    event, or a connection closed without message_stop).
    Recording: the last `record_requests` valid /v1/messages bodies are kept for
    GET /_fake/requests (0 keeps none).
    Batches: a batch ends `batch_processing_s` after its creation (its requests done one by
    one over that time, so a cancel keeps those already done), `batch_cancel_s` after a
    cancel; changing them moves live batches too. Each request done errors
    (`batch_error_rate`, an api_error) or expires (`batch_expire_rate`) at random. A create
    call takes at most `batch_max_requests` requests and `batch_max_body_bytes`;
    `batch_queue_limit` (None = no limit) caps the requests of unended batches (429 past it).
    Invalid `params` error their request when the batch ends, as the API does; with
    `batch_validate_at_create` they refuse the whole create call (400) instead.
    """

    host: str = "127.0.0.1"
    port: int = 0
    latency_ms: float = 0.0
    latency_sigma: float = 0.0
    latency_cap_ms: float | None = 120_000.0
    rpm: int | None = None
    itpm: int | None = None
    otpm: int | None = None
    family_limits: dict[str, RateLimits] = {}
    overloaded_rate: float = 0.0
    server_error_rate: float = 0.0
    stream_error_rate: float = 0.0
    stream_cut_rate: float = 0.0
    bad_keys: frozenset[str] = frozenset()
    forbidden_keys: frozenset[str] = frozenset()
    seed: int = 0
    min_output_tokens: int = 20
    max_output_tokens: int = 400
    cache_ttl_s: float = 300.0
    cache_min_tokens: int = 0
    max_body_bytes: int = 32 * 1024 * 1024
    record_requests: int = 0
    batch_processing_s: float = 2.0
    batch_cancel_s: float = 0.0
    batch_error_rate: float = 0.0
    batch_expire_rate: float = 0.0
    batch_max_requests: int = 100_000
    batch_max_body_bytes: int = 256 * 1024 * 1024
    batch_queue_limit: int | None = None
    batch_validate_at_create: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        for name in (
            "latency_ms",
            "latency_sigma",
            "cache_ttl_s",
            "batch_processing_s",
            "batch_cancel_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.latency_cap_ms is not None and self.latency_cap_ms < 0:
            raise ValueError(f"latency_cap_ms must be >= 0 or null, got {self.latency_cap_ms}")
        for name in (
            "overloaded_rate",
            "server_error_rate",
            "stream_error_rate",
            "stream_cut_rate",
            "batch_error_rate",
            "batch_expire_rate",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in 0..1, got {value}")
        if self.overloaded_rate + self.server_error_rate > 1.0:
            raise ValueError("overloaded_rate + server_error_rate must be <= 1")
        if self.stream_error_rate + self.stream_cut_rate > 1.0:
            raise ValueError("stream_error_rate + stream_cut_rate must be <= 1")
        if not 1 <= self.min_output_tokens <= self.max_output_tokens:
            raise ValueError("need 1 <= min_output_tokens <= max_output_tokens")
        if self.cache_min_tokens < 0 or self.max_body_bytes < 1:
            raise ValueError("cache_min_tokens must be >= 0 and max_body_bytes >= 1")
        if self.record_requests < 0:
            raise ValueError(f"record_requests must be >= 0, got {self.record_requests}")
        if self.batch_error_rate + self.batch_expire_rate > 1.0:
            raise ValueError("batch_error_rate + batch_expire_rate must be <= 1")
        if self.batch_max_requests < 1 or self.batch_max_body_bytes < 1:
            raise ValueError("batch_max_requests and batch_max_body_bytes must be >= 1")
        if self.batch_queue_limit is not None and self.batch_queue_limit < 1:
            raise ValueError(
                f"batch_queue_limit must be >= 1 or null, got {self.batch_queue_limit}"
            )
        # The family-independent limits are checked like a family's.
        RateLimits(rpm=self.rpm, itpm=self.itpm, otpm=self.otpm)

    def limits_for(self, family: str) -> RateLimits:
        """The limits in force for one model family."""
        override = self.family_limits.get(family)
        if override is not None:
            return override
        return RateLimits(rpm=self.rpm, itpm=self.itpm, otpm=self.otpm)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (sets become sorted lists)."""
        data: dict[str, Any] = msgspec.to_builtins(self)
        data["bad_keys"] = sorted(self.bad_keys)
        data["forbidden_keys"] = sorted(self.forbidden_keys)
        return data


def patched(config: FakeClaudeConfig, patch: Mapping[str, Any]) -> FakeClaudeConfig:
    """A copy of `config` with the fields of `patch` replaced, validated as a whole.

    Raises `msgspec.ValidationError` (a `ValueError`) on an unknown field, a wrong type or a
    value out of range, and `ValueError` when the patch tries to move the socket.
    """
    moved = sorted(k for k in FIXED_AT_START & patch.keys() if patch[k] != getattr(config, k))
    if moved:
        raise ValueError(f"cannot change {', '.join(moved)} of a running server")
    merged = config.to_dict()
    merged.update(patch)
    return msgspec.convert(merged, FakeClaudeConfig)
