"""The generation parameters of a /v1/messages body, checked as the real API checks them.

Only the top-level fields the API takes are accepted (anything else is the API's pydantic
"Extra inputs are not permitted"). Those the fake answers to (`tools`, `tool_choice`,
`thinking`, `output_config`, `stop_sequences`) are read into a `Generation`; the others are
type-checked where cheap and otherwise only accepted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: The body fields of `client.messages.create` (SDK 2.16 `MessageCreateParams`; its
#: `user_profile_id` / `workspace_id` travel as headers), plus the sampling parameters this
#: SDK dropped from its signature but the API still takes.
API_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "cache_control",
        "container",
        "diagnostics",
        "inference_geo",
        "metadata",
        "output_config",
        "service_tier",
        "speed",
        "stop_sequences",
        "stream",
        "system",
        "thinking",
        "tool_choice",
        "tools",
        "temperature",
        "top_p",
        "top_k",
    }
)
#: The body fields only `client.beta.messages.create` declares; accepted too, so a pipeline
#: passing them through is not refused by the fake (it does not act on them).
BETA_FIELDS = frozenset(
    {
        "billing_policy",
        "compaction",
        "context_management",
        "fallback_credit_token",
        "fallbacks",
        "mcp_servers",
        "thread",
    }
)
FIELDS = API_FIELDS | BETA_FIELDS

MIN_THINKING_BUDGET = 1024
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
#: A tool the API defines (`web_search_20250305`, `bash_20250124`, `tool_search_tool_bm25`...).
_TYPED_TOOL = re.compile(r"^[a-z][a-z0-9_]*$")
_CUSTOM_TOOL_KEYS = frozenset(
    {
        "name",
        "input_schema",
        "type",
        "description",
        "cache_control",
        "allowed_callers",
        "defer_loading",
        "eager_input_streaming",
        "input_examples",
        "strict",
    }
)
_EFFORTS = ("low", "medium", "high", "xhigh", "max")
_DOCS = "https://docs.claude.com/en/docs/build-with-claude/extended-thinking"


class InvalidRequest(ValueError):
    """The body breaks the API's rules; the message is what the 400 says."""


@dataclass(slots=True)
class Generation:
    """What the reply depends on beyond the request key and `max_tokens`."""

    #: (name, input_schema) of each custom tool, in the order given.
    custom_tools: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    tool_names: frozenset[str] = frozenset()
    tool_choice: str = "auto"  # "auto" | "any" | "tool" | "none"
    tool_choice_name: str | None = None
    thinking: str | None = None  # None (off), "enabled" or "adaptive"
    thinking_budget: int | None = None
    thinking_omitted: bool = False  # `display: "omitted"`: empty thinking, signature kept
    output_schema: dict[str, Any] | None = None
    stop_sequences: tuple[str, ...] = ()
    after_tool_result: bool = False  # the last user message carries a tool_result

    def called_tool(self) -> tuple[str, dict[str, Any]] | None:
        """The custom tool the reply calls, if any (server tools are never called)."""
        if self.tool_choice == "none" or not self.custom_tools:
            return None
        if self.tool_choice == "tool":
            return next((t for t in self.custom_tools if t[0] == self.tool_choice_name), None)
        if self.tool_choice == "auto" and self.after_tool_result:
            return None
        return self.custom_tools[0]

    @property
    def forces_tool(self) -> bool:
        return self.tool_choice in ("any", "tool")


def check_fields(body: Mapping[str, Any]) -> None:
    """Refuse a top-level field the API does not take, as its validation words it."""
    for name in body:
        if name not in FIELDS:
            raise InvalidRequest(f"{name}: Extra inputs are not permitted")


def parse_generation(body: Mapping[str, Any], max_tokens: int | None) -> Generation:
    """Validate and read the generation parameters of a body whose `messages` are already
    checked; `max_tokens` None is count_tokens (no budget to compare with)."""
    messages = body["messages"]
    check_tool_pairs(messages)
    gen = Generation(after_tool_result=last_user_has_tool_result(messages))
    _read_tools(gen, body.get("tools"))
    _read_tool_choice(gen, body.get("tool_choice"), bool(body.get("tools")))
    _read_thinking(gen, body.get("thinking"), max_tokens)
    if gen.thinking is not None:
        _check_thinking_compatible(gen, body)
    _read_output_config(gen, body.get("output_config"))
    gen.stop_sequences = _stop_sequences(body.get("stop_sequences"))
    _check_simple(body)
    return gen


def check_tool_pairs(messages: list[dict[str, Any]]) -> None:
    """Each `tool_use` answered by a `tool_result` in the next turn, each `tool_result`
    answering a `tool_use` of the previous turn (consecutive messages of one role are one
    turn, as the API merges them). Takes messages `prompt` has already checked."""
    uses: dict[str, int] = {}  # tool_use id -> index of its message, in the last assistant turn
    results: dict[str, int] = {}  # tool_use_id -> index of its message, in this user turn
    previous = None
    for i, message in enumerate(messages):
        role = message["role"]
        if role != previous and role == "assistant":
            _check_answered(uses, results)
            uses, results = {}, {}
        elif role != previous and previous == "assistant":
            results = {}
        previous = role
        content = message["content"]
        if not isinstance(content, list):
            continue
        for j, block in enumerate(content):
            if role == "assistant" and block["type"] == "tool_use":
                use_id = block.get("id")
                if isinstance(use_id, str):
                    uses[use_id] = i
            elif role == "user" and block["type"] == "tool_result":
                use_id = block.get("tool_use_id")
                if not isinstance(use_id, str):
                    raise InvalidRequest(
                        f"messages.{i}.content.{j}.tool_use_id: Input should be a valid string"
                    )
                if use_id not in uses:
                    raise InvalidRequest(
                        f"messages.{i}.content.{j}: unexpected `tool_use_id` found in "
                        f"`tool_result` blocks: {use_id}. Each `tool_result` block must have "
                        "a corresponding `tool_use` block in the previous message."
                    )
                results[use_id] = i
    if previous == "user":
        _check_answered(uses, results)


def _check_answered(uses: dict[str, int], results: dict[str, int]) -> None:
    missing = [use_id for use_id in uses if use_id not in results]
    if missing:
        raise InvalidRequest(
            f"messages.{uses[missing[0]]}: `tool_use` ids were found without `tool_result` "
            f"blocks immediately after: {', '.join(missing)}. Each `tool_use` block must "
            "have a corresponding `tool_result` block in the next message."
        )


def last_user_has_tool_result(messages: list[dict[str, Any]]) -> bool:
    """Whether the last user message carries a `tool_result` (the agent loop's answer)."""
    for message in reversed(messages):
        if message["role"] == "user":
            content = message["content"]
            return isinstance(content, list) and any(
                block["type"] == "tool_result" for block in content
            )
    return False


def _read_tools(gen: Generation, tools: object) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise InvalidRequest("tools: Input should be a valid list")
    names: list[str] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise InvalidRequest(f"tools.{i}: Input should be a valid dictionary")
        kind = tool.get("type")
        if kind is None or kind == "custom":
            names.append(_custom_tool(gen, tool, f"tools.{i}.custom"))
        elif isinstance(kind, str) and _TYPED_TOOL.match(kind):
            name = tool.get("name")
            if name is not None and not isinstance(name, str):
                raise InvalidRequest(f"tools.{i}.{kind}.name: Input should be a valid string")
            if name is not None:
                names.append(name)
        else:
            raise InvalidRequest(
                f"tools.{i}: Input tag {kind!r} found using 'type' does not match any of the "
                "expected tags"
            )
    if len(set(names)) != len(names):
        raise InvalidRequest("tools: Tool names must be unique.")
    gen.tool_names = frozenset(names)


def _custom_tool(gen: Generation, tool: dict[str, Any], where: str) -> str:
    for key in tool:
        if key not in _CUSTOM_TOOL_KEYS:
            raise InvalidRequest(f"{where}.{key}: Extra inputs are not permitted")
    name = tool.get("name")
    if name is None:
        raise InvalidRequest(f"{where}.name: Field required")
    if not isinstance(name, str) or not _TOOL_NAME.match(name):
        raise InvalidRequest(
            f"{where}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'"
        )
    schema = tool.get("input_schema")
    if schema is None:
        raise InvalidRequest(f"{where}.input_schema: Field required")
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{where}.input_schema: Input should be a valid dictionary")
    if schema.get("type") != "object":
        raise InvalidRequest(f"{where}.input_schema.type: Input should be 'object'")
    gen.custom_tools.append((name, schema))
    return name


def _read_tool_choice(gen: Generation, choice: object, has_tools: bool) -> None:
    if choice is None:
        return
    if not isinstance(choice, dict):
        raise InvalidRequest("tool_choice: Input should be a valid dictionary")
    kind = choice.get("type")
    if kind not in ("auto", "any", "tool", "none"):
        raise InvalidRequest(
            f"tool_choice: Input tag {kind!r} found using 'type' does not match any of the "
            "expected tags: 'auto', 'any', 'tool', 'none'"
        )
    allowed = {"type", "name"} if kind == "tool" else {"type"}
    if kind != "none":
        allowed.add("disable_parallel_tool_use")
    for key in choice:
        if key not in allowed:
            raise InvalidRequest(f"tool_choice.{kind}.{key}: Extra inputs are not permitted")
    parallel = choice.get("disable_parallel_tool_use")
    if parallel is not None and type(parallel) is not bool:
        raise InvalidRequest(
            f"tool_choice.{kind}.disable_parallel_tool_use: Input should be a valid boolean"
        )
    if not has_tools:
        raise InvalidRequest("tool_choice may only be specified while providing tools.")
    if kind == "tool":
        name = choice.get("name")
        if name is None:
            raise InvalidRequest("tool_choice.tool.name: Field required")
        if not isinstance(name, str):
            raise InvalidRequest("tool_choice.tool.name: Input should be a valid string")
        if name not in gen.tool_names:
            raise InvalidRequest(f"tool_choice.tool.name: Tool '{name}' not found in tools")
        gen.tool_choice_name = name
    gen.tool_choice = str(kind)


def _read_thinking(gen: Generation, thinking: object, max_tokens: int | None) -> None:
    if thinking is None:
        return
    if not isinstance(thinking, dict):
        raise InvalidRequest("thinking: Input should be a valid dictionary")
    kind = thinking.get("type")
    if kind not in ("enabled", "disabled", "adaptive"):
        raise InvalidRequest(
            f"thinking: Input tag {kind!r} found using 'type' does not match any of the "
            "expected tags: 'enabled', 'disabled', 'adaptive'"
        )
    allowed = {"type"} if kind == "disabled" else {"type", "display"}
    if kind == "enabled":
        allowed.add("budget_tokens")
    for key in thinking:
        if key not in allowed:
            raise InvalidRequest(f"thinking.{kind}.{key}: Extra inputs are not permitted")
    if kind == "disabled":
        return
    display = thinking.get("display")
    if display not in (None, "summarized", "omitted"):
        raise InvalidRequest(f"thinking.{kind}.display: Input should be 'summarized' or 'omitted'")
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if budget is None:
            raise InvalidRequest("thinking.enabled.budget_tokens: Field required")
        if type(budget) is not int:
            raise InvalidRequest("thinking.enabled.budget_tokens: Input should be a valid integer")
        if budget < MIN_THINKING_BUDGET:
            raise InvalidRequest(
                "thinking.enabled.budget_tokens: Input should be greater than or equal to "
                f"{MIN_THINKING_BUDGET}"
            )
        if max_tokens is not None and max_tokens <= budget:
            raise InvalidRequest(
                "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult "
                f"our documentation at {_DOCS}#max-tokens-and-context-window-size"
            )
        gen.thinking_budget = budget
    gen.thinking = str(kind)
    gen.thinking_omitted = display == "omitted"


def _check_thinking_compatible(gen: Generation, body: Mapping[str, Any]) -> None:
    """What the API refuses alongside thinking."""
    if gen.forces_tool:
        raise InvalidRequest("Thinking may not be enabled when tool_choice forces tool use.")
    see = f"Please consult our documentation at {_DOCS}#feature-compatibility"
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1:
        raise InvalidRequest(f"`temperature` may only be set to 1 when thinking is enabled. {see}")
    if body.get("top_k") is not None:
        raise InvalidRequest(f"`top_k` must be unset when thinking is enabled. {see}")
    top_p = body.get("top_p")
    if top_p is not None and top_p < 0.95:
        raise InvalidRequest(
            "`top_p` must be greater than or equal to 0.95 or unset when thinking is enabled. "
            + see
        )


def _read_output_config(gen: Generation, config: object) -> None:
    if config is None:
        return
    if not isinstance(config, dict):
        raise InvalidRequest("output_config: Input should be a valid dictionary")
    for key in config:
        if key not in ("format", "effort"):
            raise InvalidRequest(f"output_config.{key}: Extra inputs are not permitted")
    effort = config.get("effort")
    if effort is not None and effort not in _EFFORTS:
        expected = ", ".join(f"'{e}'" for e in _EFFORTS[:-1])
        raise InvalidRequest(f"output_config.effort: Input should be {expected} or 'max'")
    fmt = config.get("format")
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise InvalidRequest("output_config.format: Input should be a valid dictionary")
    if fmt.get("type") != "json_schema":
        raise InvalidRequest("output_config.format.type: Input should be 'json_schema'")
    for key in fmt:
        if key not in ("type", "schema"):
            raise InvalidRequest(f"output_config.format.{key}: Extra inputs are not permitted")
    schema = fmt.get("schema")
    if schema is None:
        raise InvalidRequest("output_config.format.schema: Field required")
    if not isinstance(schema, dict):
        raise InvalidRequest("output_config.format.schema: Input should be a valid dictionary")
    gen.output_schema = schema


def _stop_sequences(stops: object) -> tuple[str, ...]:
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequest("stop_sequences: Input should be a valid list of strings")
    if not all(s.strip() for s in stops):
        raise InvalidRequest("stop_sequences: each stop sequence must contain non-whitespace")
    return tuple(stops)


def _check_simple(body: Mapping[str, Any]) -> None:
    """The fields the fake only accepts: their types, where the API's are plain."""
    tier = body.get("service_tier")
    if tier is not None and tier not in ("auto", "standard_only"):
        raise InvalidRequest("service_tier: Input should be 'auto' or 'standard_only'")
    speed = body.get("speed")
    if speed is not None and speed not in ("standard", "fast"):
        raise InvalidRequest("speed: Input should be 'standard' or 'fast'")
    geo = body.get("inference_geo")
    if geo is not None and not isinstance(geo, str):
        raise InvalidRequest("inference_geo: Input should be a valid string")
    container = body.get("container")
    if container is not None and not isinstance(container, str | dict):
        raise InvalidRequest("container: Input should be a valid string or dictionary")
    for name in ("diagnostics", "context_management"):
        value = body.get(name)
        if value is not None and not isinstance(value, dict):
            raise InvalidRequest(f"{name}: Input should be a valid dictionary")
    servers = body.get("mcp_servers")
    if servers is not None and not isinstance(servers, list):
        raise InvalidRequest("mcp_servers: Input should be a valid list")
