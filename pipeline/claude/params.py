"""The Messages parameters a task passes through beyond the core ones (DESIGN: wire format).

A producer names the common ones as fields of their own (`tools`, `tool_choice`, `thinking`,
`stop_sequences`, `top_p`, `top_k`, `service_tier`, `output_format`, `cache_control`,
`user_id`) and any other Messages parameter in `params`, one JSON object passed through
untouched, so a parameter Anthropic adds tomorrow works without a release. Together they
become one dict, the request body's extra parameters (`Request.params`), checked here where
the pipeline knows the rules, so a mistake fails at ingress with the field's name rather than
as a paid 400 or, worse, as a silently different call. The core fields (model, messages,
max_tokens, system, temperature) have their own rules in `pipeline.claude.request`, and
`stream` is the pipeline's to decide (`pipeline.claude.api`), so `params` may not set them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.claude.field_text import decode_json, kind, show
from pipeline.runtime.errors import InvalidTask

__all__ = ["NAMED_FIELDS", "UNKEYED", "check_budget", "parse_params", "thinks"]

#: Wire fields that are Messages parameters of their own, in the order they are written.
NAMED_FIELDS = (
    "tools",
    "tool_choice",
    "thinking",
    "stop_sequences",
    "top_p",
    "top_k",
    "service_tier",
    "output_format",
    "cache_control",
    "user_id",
    "params",
)
#: Parameters that change how a call is billed or served, never what the model says: the
#: cache key leaves them out (`pipeline.claude.request.request_hash`).
UNKEYED = frozenset({"metadata", "cache_control", "service_tier"})
#: Body fields with a wire field (or a decision) of their own: `params` may not set them.
_OWNED = {
    "model": "give it as the 'model' field",
    "messages": "give it as the 'prompt' or 'messages' field",
    "max_tokens": "give it as the 'max_tokens' field",
    "system": "give it as the 'system' field",
    "temperature": "give it as the 'temperature' field",
    "stream": "the pipeline streams long calls itself (claude.stream_from_max_tokens)",
}
_TOOL_CHOICES = frozenset({"auto", "any", "tool", "none"})
_THINKING = frozenset({"enabled", "disabled", "adaptive"})
_SERVICE_TIERS = frozenset({"auto", "standard_only"})
_MIN_THINKING_BUDGET = 1024
_MAX_USER_ID_CHARS = 256


def parse_params(
    fields: Mapping[str, str], max_tokens: int | None, temperature: float | None = None
) -> dict[str, Any]:
    """The extra body parameters a task's fields ask for (empty when none), checked.

    `max_tokens` and `temperature` are the producer's (None: not given), for the rules
    extended thinking sets on them.

    Raises:
        InvalidTask: a field is malformed, or a parameter is given twice; the message names it.
    """
    raw = fields.get("params")
    params = _params_object(raw) if raw else {}
    where = {key: f"params.{key}" for key in params}  # a body key -> the field it came from
    for name in NAMED_FIELDS[:-1]:
        value = fields.get(name)
        if not value:
            continue
        key, api_value = _NAMED[name](name, value)
        if key == "output_config" and isinstance(params.get(key), dict):
            api_value = _merged_format(params[key], api_value)
        elif key in params:
            raise InvalidTask(f"{name}: given twice, as a field and as params.{key}; give it once")
        params[key], where[key] = api_value, name
    for key, value in params.items():
        check = _CHECKS.get(key)
        if check is not None:
            check(where[key], value)
    _check_together(params, max_tokens, temperature)
    return params


def check_budget(params: Mapping[str, Any], max_tokens: int) -> None:
    """The thinking budget against the `max_tokens` the call is routed with (the config's
    default or a type's cap, when the producer gave none).

    Raises:
        InvalidTask: the budget is not below it (the API would refuse the call).
    """
    thinking = params.get("thinking")
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    if thinks(params) and type(budget) is int and budget >= max_tokens:
        raise InvalidTask(
            f"thinking.budget_tokens: {budget} must be less than max_tokens ({max_tokens}, "
            "after the router's default and caps); give a larger max_tokens"
        )


def thinks(params: Mapping[str, Any]) -> bool:
    """Whether the call asks for extended thinking (it may then run long)."""
    thinking = params.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")


# ---- the named fields: wire text -> (body key, value) ---------------------------------------


def _json_field(name: str, raw: str) -> tuple[str, Any]:
    return name, decode_json(name, raw)


def _number_field(name: str, raw: str) -> tuple[str, Any]:
    try:
        value: float | int = int(raw) if name == "top_k" else float(raw)
    except ValueError:
        kind = "a whole number" if name == "top_k" else "a number"
        raise InvalidTask(f"{name}: must be {kind}, got {show(raw)}") from None
    return name, value


def _text_field(name: str, raw: str) -> tuple[str, Any]:
    return name, raw.strip()


def _output_format(name: str, raw: str) -> tuple[str, Any]:
    """The API takes structured output as `output_config.format`."""
    value = decode_json(name, raw)
    _check_output_format(name, value)
    return "output_config", {"format": value}


def _user_id(name: str, raw: str) -> tuple[str, Any]:
    """The API takes the end user's id as `metadata.user_id` (the task's own `metadata` is
    the producer's, returned with the result, never sent)."""
    user_id = raw.strip()
    if len(user_id) > _MAX_USER_ID_CHARS:
        raise InvalidTask(f"user_id: at most {_MAX_USER_ID_CHARS} characters")
    return "metadata", {"user_id": user_id}


_NAMED: dict[str, Callable[[str, str], tuple[str, Any]]] = {
    "tools": _json_field,
    "tool_choice": _json_field,
    "thinking": _json_field,
    "stop_sequences": _json_field,
    "top_p": _number_field,
    "top_k": _number_field,
    "service_tier": _text_field,
    "output_format": _output_format,
    "cache_control": _json_field,
    "user_id": _user_id,
}


def _merged_format(config: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`output_format` joins the other output settings of `params.output_config`."""
    if "format" in config:
        raise InvalidTask(
            "output_format: given twice, as a field and as params.output_config.format"
        )
    return {**config, **given}


def _params_object(raw: str) -> dict[str, Any]:
    value = decode_json("params", raw)
    if not isinstance(value, dict):
        raise InvalidTask(
            f"params: must be a JSON object of Messages parameters, not {kind(value)}"
        )
    for key in value:
        if key in _OWNED:
            raise InvalidTask(f"params.{key}: not allowed here; {_OWNED[key]}")
    return dict(value)


# ---- the rules of each body parameter -------------------------------------------------------


def _check_tools(name: str, tools: Any) -> None:
    if not isinstance(tools, list) or not tools:
        raise InvalidTask(f"{name}: must be a non-empty JSON array of tool definitions")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"{name}[{i}]"
        if not isinstance(tool, dict):
            raise InvalidTask(f"{where}: must be a tool definition object")
        tool_name = tool.get("name")
        if not isinstance(tool_name, str) or not tool_name:
            raise InvalidTask(f"{where}.name: must be a non-empty string")
        if tool_name in seen:
            raise InvalidTask(f"{where}.name: {tool_name!r} is defined twice")
        seen.add(tool_name)
        custom = tool.get("type") in (None, "custom")
        if custom and not isinstance(tool.get("input_schema"), dict):
            raise InvalidTask(f"{where}.input_schema: a custom tool needs a JSON schema object")


def _check_tool_choice(name: str, choice: Any) -> None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in _TOOL_CHOICES:
        raise InvalidTask(f"{name}: must be an object whose type is auto, any, tool or none")
    if kind == "tool" and not isinstance(choice.get("name"), str):
        raise InvalidTask(f"{name}.name: tool_choice of type 'tool' names the tool")


def _check_thinking(name: str, thinking: Any) -> None:
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in _THINKING:
        raise InvalidTask(f"{name}: must be an object whose type is enabled, adaptive or disabled")
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if type(budget) is not int or budget < _MIN_THINKING_BUDGET:
            raise InvalidTask(
                f"{name}.budget_tokens: must be a whole number of at least {_MIN_THINKING_BUDGET}"
            )


def _check_stop_sequences(name: str, stops: Any) -> None:
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidTask(f"{name}: must be a JSON array of non-empty strings")


def _check_top_p(name: str, value: Any) -> None:
    if type(value) not in (int, float) or not (math.isfinite(value) and 0 <= value <= 1):
        raise InvalidTask(f"{name}: must be a number from 0 to 1, got {show(value)}")


def _check_top_k(name: str, value: Any) -> None:
    if type(value) is not int or value < 1:
        raise InvalidTask(f"{name}: must be a whole number of at least 1, got {show(value)}")


def _check_service_tier(name: str, value: Any) -> None:
    if value not in _SERVICE_TIERS:
        raise InvalidTask(f"{name}: must be auto or standard_only, got {show(value)}")


def _check_cache_control(name: str, value: Any) -> None:
    if not isinstance(value, dict) or value.get("type") != "ephemeral":
        raise InvalidTask(f'{name}: must be {{"type": "ephemeral"}} (with an optional ttl)')
    if value.get("ttl", "5m") not in ("5m", "1h"):
        raise InvalidTask(f"{name}.ttl: must be 5m or 1h")


def _check_metadata(name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise InvalidTask(f"{name}: must be an object (the API's metadata, e.g. user_id)")
    user_id = value.get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        raise InvalidTask(f"{name}.user_id: must be a string")


def _check_output_format(name: str, value: Any) -> None:
    if (
        not isinstance(value, dict)
        or value.get("type") != "json_schema"
        or not isinstance(value.get("schema"), dict)
    ):
        raise InvalidTask(f'{name}: must be {{"type": "json_schema", "schema": {{…}}}}')


def _check_output_config(name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise InvalidTask(f"{name}: must be an object")
    if value.get("format") is not None:
        where = name if name == "output_format" else f"{name}.format"
        _check_output_format(where, value["format"])


_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "tools": _check_tools,
    "tool_choice": _check_tool_choice,
    "thinking": _check_thinking,
    "stop_sequences": _check_stop_sequences,
    "top_p": _check_top_p,
    "top_k": _check_top_k,
    "service_tier": _check_service_tier,
    "cache_control": _check_cache_control,
    "metadata": _check_metadata,
    "output_config": _check_output_config,
}


def _check_together(
    params: Mapping[str, Any], max_tokens: int | None, temperature: float | None
) -> None:
    """Rules across parameters, which the API would otherwise refuse after routing (the
    extended thinking ones are Anthropic's documented feature compatibility)."""
    choice = params.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
        tools = params.get("tools") or []
        if not tools:
            raise InvalidTask("tool_choice: asks for a tool, but no tools are given")
        if choice["type"] == "tool" and choice["name"] not in {t.get("name") for t in tools}:
            raise InvalidTask(f"tool_choice.name: {choice['name']!r} is not one of the tools")
    thinking = params.get("thinking")
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    if not thinks(params):
        return
    if max_tokens is not None and type(budget) is int and budget >= max_tokens:
        raise InvalidTask(
            f"thinking.budget_tokens: {budget} must be less than max_tokens ({max_tokens})"
        )
    if isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
        raise InvalidTask("tool_choice: may not force a tool with extended thinking (use auto)")
    if params.get("top_k") is not None:
        raise InvalidTask("top_k: must be left out with extended thinking")
    top_p = params.get("top_p")
    if isinstance(top_p, int | float) and top_p < 0.95:
        raise InvalidTask(f"top_p: must be 0.95 or more with extended thinking, got {top_p}")
    if temperature is not None and temperature != 1:
        raise InvalidTask(
            f"temperature: must be 1 or left out with extended thinking, got {temperature}"
        )
