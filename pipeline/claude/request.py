"""A producer's flat fields -> a validated `Request`, and the request's canonical hash.

Carries the "Poison is contained" guarantee (bad input gets a clear error): every rule of
DESIGN's wire format is checked here, once, and a violation raises `InvalidTask` naming the
field and the problem, so cache-check dead-letters it with that reason and the producer can read
what to fix.

Conventions: an optional field given as an empty string counts as not given (producers
with fixed templates send them); a field the wire format does not name fails the task with
its name (DESIGN: nothing a producer sent is dropped silently; a producer's own data goes in
`metadata`, and any Messages parameter in `params`, see `pipeline.claude.params`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import msgspec

from pipeline.claude.field_text import decode_json, kind, show
from pipeline.claude.params import NAMED_FIELDS, UNKEYED, check_budget, parse_params
from pipeline.claude.routing import route
from pipeline.claude.settings import Settings
from pipeline.claude.task import Request, Route
from pipeline.runtime.errors import InvalidTask
from pipeline.runtime.results import MAX_TTL_S

MAX_MAX_TOKENS = 1_000_000  # far above any model's output limit; stops absurd reservations
HASH_HEX_CHARS = 32  # 128 bits of SHA-256: collisions are not a practical concern
_ROLES = ("user", "assistant")
_MESSAGE_KEYS = frozenset({"role", "content"})
_SYSTEM_BLOCK_KEYS = frozenset({"type", "text", "cache_control", "citations"})
_TYPE_LABEL = re.compile(r"[a-z0-9][a-z0-9_.\-]{0,63}")
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/\-]{0,127}")
_BOOLS = {"true": True, "1": True, "false": False, "0": False}
_json = msgspec.json.Decoder()
#: Every field of DESIGN's wire format, in the order a client writes them: the request's,
#: then the Messages parameters passed through, then the task's own (id, ttl, trace context).
WIRE_FIELDS = (
    "prompt",
    "messages",
    "system",
    "model",
    "max_tokens",
    "temperature",
    *NAMED_FIELDS,
    "type",
    "id",
    "cache",
    "batch",
    "deadline",
    "ttl",
    "metadata",
    "traceparent",
    "tracestate",
)
_KNOWN = frozenset(WIRE_FIELDS)


def parse_request(fields: Mapping[str, str], settings: Settings) -> Request:
    """Validate, normalise and route a task's wire fields (cache-check's first step).

    The one place a task's route is decided: the request comes back with the decision
    (`Request.decision`) and the cache key computed from it (`request_hash`), and carries
    both to the router, which applies the decision rather than making it again.

    Raises:
        InvalidTask: a field breaks the wire format; the message names the field.
    """
    request = validate_request(fields, settings)
    decision = route(request, settings, prompt_chars(request))
    if decision is not None and request.params:
        check_budget(request.params, decision.max_tokens)
    return msgspec.structs.replace(
        request, decision=decision, request_hash=request_hash(request, decision)
    )


def validate_request(fields: Mapping[str, str], settings: Settings) -> Request:
    """Validate and normalise a task's wire fields, deciding nothing: no route, no hash.

    What a producer checks a task with before sending it (`pipeline.client`): the rules are
    cache-check's own, but judging a model name is not routing the task.

    Raises:
        InvalidTask: a field breaks the wire format; the message names the field.
    """
    ingress = settings.ingress
    _check_known(fields)
    messages = _conversation(fields, ingress.max_prompt_bytes)
    _check_ttl(fields)
    max_tokens = _max_tokens(_optional(fields, "max_tokens"))
    temperature = _temperature(_optional(fields, "temperature"))
    return Request(
        messages=messages,
        system=_system(_optional(fields, "system")),
        model=_model(_optional(fields, "model"), settings),
        max_tokens=max_tokens,
        temperature=temperature,
        params=parse_params(fields, max_tokens, temperature),
        type=_type_label(_optional(fields, "type")),
        cache=_flag("cache", _optional(fields, "cache"), default=True),
        batch=_optional_flag("batch", _optional(fields, "batch")),
        deadline_s=_deadline(_optional(fields, "deadline")),
        metadata=_metadata(_optional(fields, "metadata"), ingress.max_metadata_bytes),
    )


def request_hash(request: Request, decision: Route | None) -> str:
    """A short canonical hash of everything that determines the answer (the cache key).

    Covers what the API is sent: the routing decision (model id and max_tokens after caps,
    `pipeline.claude.routing.route`), system, messages, temperature and every passed-through
    parameter that can change the answer (tools, thinking, stop sequences, top_p, output
    format, and any `params` key, known or not; not `params.UNKEYED`), as canonical JSON
    (sorted keys, no whitespace). Keying by the decision rather than by the model choice, task type
    and routing settings means `model=sonnet` and its full id share answers, and a rule
    change re-keys exactly the requests it sends elsewhere. With no decision (a model the
    router will refuse) the model choice stands in. `cache_control` markers are left out:
    they change what prompt caching bills, never the answer. A `prompt` and the equal
    one-message `messages` hash the same, and so do a string and a single plain text block.
    A request with no parameters passed through hashes as it did before they existed, so an
    upgrade keeps the cache.
    """
    canonical = {
        "v": 2,
        "model": request.model if decision is None else decision.model,
        "max_tokens": request.max_tokens if decision is None else decision.max_tokens,
        "system": _canonical_content(request.system),
        "messages": [
            {"role": m["role"], "content": _canonical_content(m["content"])}
            for m in request.messages
        ],
        "temperature": request.temperature,
    }
    keyed = {k: _without_cache_control(k, v) for k, v in request.params.items() if k not in UNKEYED}
    if keyed:
        canonical["params"] = keyed
    text = msgspec.json.encode(canonical, order="sorted")
    return hashlib.sha256(text).hexdigest()[:HASH_HEX_CHARS]


def prompt_chars(request: Request) -> int:
    """Characters of text the model reads (system and every message), for routing rules."""
    return _text_chars(request.system) + sum(_text_chars(m["content"]) for m in request.messages)


# ---- prompt / messages ---------------------------------------------------------------------


def _conversation(fields: Mapping[str, str], max_bytes: int) -> list[dict[str, Any]]:
    prompt, raw = fields.get("prompt"), fields.get("messages")
    if prompt is not None and raw is not None:
        raise InvalidTask("prompt and messages: both given; give exactly one of them")
    if prompt is None and raw is None:
        raise InvalidTask(
            "prompt or messages: missing; give the text as 'prompt' "
            "or a JSON array of messages as 'messages'"
        )
    name, text = ("prompt", prompt) if prompt is not None else ("messages", raw or "")
    parts = [name, *(f for f in ("system", *NAMED_FIELDS) if fields.get(f))]
    size = len(text.encode()) + sum(len(fields[f].encode()) for f in parts[1:])
    if size > max_bytes:
        raise InvalidTask(
            f"{' + '.join(parts)}: {size} bytes, over the {max_bytes}-byte limit "
            "(ingress.max_prompt_bytes)"
        )
    if prompt is not None:
        if not prompt.strip():
            raise InvalidTask("prompt: is empty")
        return [{"role": "user", "content": prompt}]
    return _messages(text)


def _messages(raw: str) -> list[dict[str, Any]]:
    messages = decode_json("messages", raw)
    if not isinstance(messages, list):
        raise InvalidTask(f"messages: must be a JSON array of messages, got {kind(messages)}")
    if not messages:
        raise InvalidTask("messages: is empty; give at least one message")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidTask(f"{where}: must be an object with 'role' and 'content'")
        extra = sorted(set(message) - _MESSAGE_KEYS)
        if extra:
            raise InvalidTask(
                f"{where}: unknown key {extra[0]!r} (a message has only 'role' and 'content')"
            )
        if "role" not in message:
            raise InvalidTask(f"{where}.role: missing")
        role = message["role"]
        if role not in _ROLES:
            hint = " (put a system prompt in the 'system' field)" if role == "system" else ""
            raise InvalidTask(
                f"{where}.role: must be 'user' or 'assistant', got {show(role)}{hint}"
            )
        if "content" not in message:
            raise InvalidTask(f"{where}.content: missing")
        _check_content(f"{where}.content", message["content"])
    if messages[0]["role"] != "user":
        raise InvalidTask(
            "messages[0].role: the first message must be from 'user', got 'assistant'"
        )
    return messages


def _check_content(where: str, content: object) -> None:
    if isinstance(content, str):
        if not content.strip():
            raise InvalidTask(f"{where}: is empty")
        return
    if not isinstance(content, list):
        raise InvalidTask(
            f"{where}: must be a string or a list of content blocks, got {kind(content)}"
        )
    if not content:
        raise InvalidTask(f"{where}: is an empty list of content blocks")
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise InvalidTask(f"{where}[{j}]: must be a content block object with a 'type'")
        if block["type"] == "text":
            _check_text_block(f"{where}[{j}]", block)


def _check_text_block(where: str, block: dict[str, Any]) -> None:
    text = block.get("text")
    if not isinstance(text, str) or not text.strip():
        raise InvalidTask(f"{where}.text: must be a non-empty string")


def _check_known(fields: Mapping[str, str]) -> None:
    unknown = sorted(name for name in fields if name not in _KNOWN)
    if unknown:
        raise InvalidTask(
            f"{show(unknown[0])}: not a field of the wire format; put your own data in "
            "'metadata' and other Messages parameters in 'params'"
        )


# ---- system ---------------------------------------------------------------------------------


def _system(raw: str | None) -> str | list[dict[str, Any]] | None:
    """A string, or a JSON array of text blocks (kept as given, cache_control included).

    Only an array of objects is taken for blocks, so a system prompt that merely starts with
    `[` stays text; an array of objects that are not valid text blocks is an error.
    """
    if raw is None or not raw.strip():
        return None
    if not raw.lstrip().startswith("["):
        return raw
    try:
        blocks = _json.decode(raw)
    except msgspec.DecodeError:
        return raw
    if not blocks or not all(isinstance(b, dict) for b in blocks):
        return raw
    for i, block in enumerate(blocks):
        where = f"system[{i}]"
        if block.get("type") != "text":
            raise InvalidTask(f"{where}.type: must be 'text', got {show(block.get('type'))}")
        extra = sorted(set(block) - _SYSTEM_BLOCK_KEYS)
        if extra:
            raise InvalidTask(f"{where}: unknown key {extra[0]!r} in a system text block")
        _check_text_block(where, block)
    return list(blocks)


# ---- scalar fields --------------------------------------------------------------------------


def _optional(fields: Mapping[str, str], name: str) -> str | None:
    value = fields.get(name)
    return value if value else None


def _model(raw: str | None, settings: Settings) -> str:
    if raw is None:
        return "auto"
    model = raw.strip()
    if not _MODEL.fullmatch(model):
        raise InvalidTask(
            "model: must be auto, a family alias or a model id "
            f"(no spaces, at most 128 characters), got {show(raw)}"
        )
    lowered = model.lower()
    return lowered if lowered == "auto" or lowered in settings.claude.models else model


def _max_tokens(raw: str | None) -> int | None:
    if raw is None:
        return None
    value = raw.strip()
    if not value.isascii() or not value.isdigit() or not 0 < int(value) <= MAX_MAX_TOKENS:
        raise InvalidTask(
            f"max_tokens: must be a whole number from 1 to {MAX_MAX_TOKENS}, got {show(raw)}"
        )
    return int(value)


def _temperature(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise InvalidTask(f"temperature: must be a number from 0 to 1, got {show(raw)}")
    return value if value else 0.0  # -0.0 would hash apart from 0.0


def _type_label(raw: str | None) -> str:
    if raw is None:
        return "default"
    label = raw.strip().lower()
    if not _TYPE_LABEL.fullmatch(label):
        raise InvalidTask(
            "type: must be a short label (letters, digits, '_', '-', '.'; at most 64 "
            f"characters), got {show(raw)}"
        )
    return label


def _flag(name: str, raw: str | None, default: bool) -> bool:
    flag = _optional_flag(name, raw)
    return default if flag is None else flag


def _optional_flag(name: str, raw: str | None) -> bool | None:
    if raw is None:
        return None
    flag = _BOOLS.get(raw.strip().lower())
    if flag is None:
        raise InvalidTask(f"{name}: must be true, false, 1 or 0, got {show(raw)}")
    return flag


def _deadline(raw: str | None) -> int | None:
    """Seconds from now by which the producer needs the answer (it keeps the task out of the
    batch lane when the lane could not make it)."""
    if raw is None:
        return None
    value = raw.strip()
    if not value.isascii() or not value.isdigit() or int(value) < 1:
        raise InvalidTask(f"deadline: must be whole seconds of at least 1, got {show(raw)}")
    return int(value)


def _check_ttl(fields: Mapping[str, str]) -> None:
    """The store reads `ttl` itself (`result_ttl`); here it is only checked."""
    raw = _optional(fields, "ttl")
    if raw is None:
        return
    value = raw.strip()
    if not value.isascii() or not value.isdigit() or not 0 < int(value) <= MAX_TTL_S:
        raise InvalidTask(f"ttl: must be whole seconds from 1 to {MAX_TTL_S}, got {show(raw)}")


def _metadata(raw: str | None, max_bytes: int) -> str:
    if raw is None:
        return "{}"
    size = len(raw.encode())
    if size > max_bytes:
        raise InvalidTask(
            f"metadata: {size} bytes, over the {max_bytes}-byte limit (ingress.max_metadata_bytes)"
        )
    value = decode_json("metadata", raw)
    if not isinstance(value, dict):
        raise InvalidTask(f"metadata: must be a JSON object, got {kind(value)}")
    return raw


# ---- helpers --------------------------------------------------------------------------------


def _without_cache_control(key: str, value: Any) -> Any:
    """A tool list without its `cache_control` markers (they change billing, not answers)."""
    if key != "tools" or not isinstance(value, list):
        return value
    return [
        {k: v for k, v in t.items() if k != "cache_control"} if isinstance(t, dict) else t
        for t in value
    ]


def _canonical_content(content: Any) -> Any:
    """Blocks without their `cache_control`; a single plain text block means its text."""
    if not isinstance(content, list):
        return content
    blocks = [
        {k: v for k, v in b.items() if k != "cache_control"} if isinstance(b, dict) else b
        for b in content
    ]
    first = blocks[0] if len(blocks) == 1 else None
    if isinstance(first, dict) and first.keys() == {"type", "text"} and first["type"] == "text":
        return first["text"]
    return blocks


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(b["text"])
            for b in content
            if isinstance(b, dict) and isinstance(b.get("text"), str)
        )
    return 0
