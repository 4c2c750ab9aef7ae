"""Every Messages parameter through all four stages, as a producer in any language sends it
(plain XADD fields), proven to reach the API by the fake's record of each request, with the
answer's blocks in the result; unknown fields refused; long calls streamed; broken streams
retried and paid once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline.fake_claude import FakeClaudeConfig, FakeClaudeServer, run_fake_claude_in_thread
from pipeline.runtime.keys import Keys
from tests.claude.test_api_fidelity import TOOLS
from tests.helpers.outcomes import tally
from tests.helpers.workers import Workers, wait_until

pytestmark = pytest.mark.chaos

SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}
#: name -> (the fields a producer adds, what the API must have received, a check of the result)
CASES: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "tools": ({"tools": json.dumps(TOOLS)}, {"tools": TOOLS}),
    "tool_choice": (
        {"tools": json.dumps(TOOLS), "tool_choice": '{"type": "any"}'},
        {"tools": TOOLS, "tool_choice": {"type": "any"}},
    ),
    "thinking": (
        {"thinking": '{"type": "enabled", "budget_tokens": 1024}', "max_tokens": "4000"},
        {"thinking": {"type": "enabled", "budget_tokens": 1024}, "stream": True},
    ),
    "stop_sequences": ({"stop_sequences": '["stream"]'}, {"stop_sequences": ["stream"]}),
    "top_p": ({"top_p": "0.5"}, {"top_p": 0.5}),
    "top_k": ({"top_k": "7"}, {"top_k": 7}),
    "service_tier": ({"service_tier": "standard_only"}, {"service_tier": "standard_only"}),
    "output_format": (
        {"output_format": json.dumps({"type": "json_schema", "schema": SCHEMA})},
        {"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}},
    ),
    "cache_control": ({"cache_control": '{"type": "ephemeral"}'},
                      {"cache_control": {"type": "ephemeral"}}),
    "user_id": ({"user_id": "end-user-9"}, {"metadata": {"user_id": "end-user-9"}}),
    "params": ({"params": '{"inference_geo": "us", "speed": "standard"}'},
               {"inference_geo": "us", "speed": "standard"}),
}  # fmt: skip


@pytest.fixture
def fake() -> Iterator[FakeClaudeServer]:
    config = FakeClaudeConfig(latency_ms=50, record_requests=1000, seed=11)
    with run_fake_claude_in_thread(config) as server:
        yield server


@pytest.fixture
def workers(fast_env: dict[str, str], fake: FakeClaudeServer, tmp_path: Path) -> Iterator[Workers]:
    env = {
        **fast_env,
        "ANTHROPIC_BASE_URL": fake.base_url,
        "ANTHROPIC_API_KEY": "good-key",
        "PIPELINE_RETRY__BASE_MS": "50",
        "PIPELINE_RETRY__MAX_MS": "200",
        "PIPELINE_RETRY__MAX_ATTEMPTS": "20",
    }
    w = Workers(env, tmp_path, app="stages:app")
    w.start(args=["-n", "50"])
    yield w
    w.stop_all()


def xadd(client: redis.Redis, prefix: str, task_id: str, prompt: str, **fields: str) -> None:
    client.xadd(Keys(prefix).ingress, {"id": task_id, "prompt": prompt, "model": "haiku", **fields})


def result(client: redis.Redis, prefix: str, task_id: str) -> dict[str, str]:
    raw = client.hgetall(Keys(prefix).result(task_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


def wait_results(client: redis.Redis, prefix: str, ids: list[str], timeout: float = 60) -> None:
    keys = Keys(prefix)
    wait_until(lambda: all(client.exists(keys.result(i)) for i in ids), timeout,
               what=f"{len(ids)} results")  # fmt: skip


def sent_for(fake: FakeClaudeServer, prompt: str) -> list[dict[str, Any]]:
    return [b for b in fake.requests() if b["messages"][-1]["content"] == prompt]


def test_every_parameter_reaches_the_api_and_its_answer_comes_back(
    workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    for name, (fields, _) in CASES.items():
        xadd(rclient, prefix, name, f"{name}: what is the status of order 42?", **fields)
    xadd(rclient, prefix, "unknown", "hello", colour="blue")
    wait_results(rclient, prefix, [*CASES, "unknown"])
    for name, (_, expected) in CASES.items():
        res = result(rclient, prefix, name)
        assert res["status"] == "completed", (name, res)
        [body] = sent_for(fake, f"{name}: what is the status of order 42?")
        assert {k: body.get(k) for k in expected} == expected, name
        blocks = json.loads(res["content"])
        assert blocks and res["output"] == "".join(b.get("text", "") for b in blocks)
        assert res["message_id"].startswith("msg_") and res["request_id"].startswith("req_")
        assert json.loads(res["usage"])["output_tokens"] == int(res["output_tokens"])
    tool_use = json.loads(result(rclient, prefix, "tool_choice")["content"])
    assert [b["type"] for b in tool_use] == ["tool_use"]
    assert result(rclient, prefix, "tool_choice")["stop_reason"] == "tool_use"
    assert [b["type"] for b in json.loads(result(rclient, prefix, "thinking")["content"])] == [
        "thinking", "text",
    ]  # fmt: skip
    stopped = result(rclient, prefix, "stop_sequences")
    assert (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", "stream")
    assert "label" in json.loads(result(rclient, prefix, "output_format")["output"])
    # A field the pipeline does not know: refused, naming it, never dropped silently.
    refused = result(rclient, prefix, "unknown")
    assert refused["status"] == "failed" and "'colour'" in refused["error"]
    letters = rclient.xrange(Keys(prefix).dlq)
    assert [json.loads(fields[b"fields"])["colour"] for _, fields in letters] == ["blue"]
    assert not sent_for(fake, "hello")
    t = tally(rclient, prefix)
    t.assert_exactly_once([*CASES, "unknown"])


def test_the_same_prompt_with_other_parameters_never_shares_an_answer(
    workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    prompt = "Which tool should I use for order 42?"
    variants = {
        "plain": {},
        "tools": {"tools": json.dumps(TOOLS)},
        "thinking": {"thinking": '{"type": "enabled", "budget_tokens": 1024}',
                     "max_tokens": "2048"},
        "stop": {"stop_sequences": '["order"]'},
        "stop2": {"stop_sequences": '["tool"]'},
        "top_k": {"top_k": "3"},
    }  # fmt: skip
    for name, fields in variants.items():
        xadd(rclient, prefix, name, prompt, **fields)
    wait_results(rclient, prefix, list(variants))
    assert len(sent_for(fake, prompt)) == len(variants), "each variant is its own call"
    # The same again: every answer from the cache, each its own variant's.
    for name, fields in variants.items():
        xadd(rclient, prefix, f"{name}-again", prompt, **fields)
    wait_results(rclient, prefix, [f"{n}-again" for n in variants])
    assert len(sent_for(fake, prompt)) == len(variants), "no new call"
    for name in variants:
        first, again = result(rclient, prefix, name), result(rclient, prefix, f"{name}-again")
        assert again["cached"] == "true", name
        assert (again["content"], again["output"]) == (first["content"], first["output"]), name
        assert again["message_id"] == first["message_id"], "the answer of the call it was"


def test_a_64000_token_answer_is_streamed_end_to_end(
    workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    fake.update_config(min_output_tokens=64_000, max_output_tokens=64_000)
    xadd(rclient, prefix, "long", "Write the whole manual.", max_tokens="64000")
    wait_results(rclient, prefix, ["long"], timeout=120)
    res = result(rclient, prefix, "long")
    assert res["status"] == "completed", res
    assert res["output_tokens"] == "64000" and len(res["output"].split()) == 64_000
    [body] = sent_for(fake, "Write the whole manual.")
    assert body["stream"] is True and body["max_tokens"] == 64_000


def test_streams_broken_half_way_are_retried_and_each_task_paid_once(
    workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    fake.update_config(stream_error_rate=0.25, stream_cut_rate=0.25)
    ids = [f"s{i}" for i in range(40)]
    for i, task_id in enumerate(ids):  # extended thinking: every call is streamed
        xadd(rclient, prefix, task_id, f"stream task {i}", max_tokens="2048",
             thinking='{"type": "enabled", "budget_tokens": 1024}')  # fmt: skip
    wait_results(rclient, prefix, ids, timeout=120)
    t = tally(rclient, prefix)
    t.assert_exactly_once(ids)
    assert t.completed() == len(ids)
    stats = fake.stats()
    assert stats["streams_errored"] > 0 and stats["streams_cut"] > 0
    assert stats["max_calls_per_request"] == 1 and stats["distinct_requests"] == len(ids)
    for task_id in ids:  # each its own whole answer
        res = result(rclient, prefix, task_id)
        assert [b["type"] for b in json.loads(res["content"])] == ["thinking", "text"], res
        assert int(res["attempts"]) >= 1
    assert sum(int(result(rclient, prefix, i)["attempts"]) > 1 for i in ids) > 0, "none retried"


def test_an_agent_loop_tool_call_then_tool_result_then_answer(
    workers: Workers, fake: FakeClaudeServer, rclient: redis.Redis, prefix: str
) -> None:
    """The agent's turn: the tool call comes back whole, the tool's result goes in as the
    next task's `messages` (with an image the user sent), and the answer ends the turn."""
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}  # fmt: skip
    question = [{"role": "user", "content": [image, {"type": "text", "text": "Where is 42?"}]}]
    xadd_messages = {"messages": json.dumps(question), "tools": json.dumps(TOOLS)}
    rclient.xadd(Keys(prefix).ingress, {"id": "turn-1", "model": "haiku", **xadd_messages})
    wait_results(rclient, prefix, ["turn-1"])
    first = result(rclient, prefix, "turn-1")
    assert first["stop_reason"] == "tool_use", first
    blocks = json.loads(first["content"])
    call = next(b for b in blocks if b["type"] == "tool_use")
    conversation = [
        *question,
        {"role": "assistant", "content": blocks},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"],
                                      "content": "shipped yesterday"}]},
    ]  # fmt: skip
    rclient.xadd(Keys(prefix).ingress, {"id": "turn-2", "model": "haiku",
                                        "messages": json.dumps(conversation),
                                        "tools": json.dumps(TOOLS)})  # fmt: skip
    wait_results(rclient, prefix, ["turn-2"])
    second = result(rclient, prefix, "turn-2")
    assert (second["status"], second["stop_reason"]) == ("completed", "end_turn"), second
    assert second["output"]
    sent = fake.requests()[-1]
    assert sent["messages"][1]["content"] == blocks, "the tool call went back as it came"
    assert sent["messages"][0]["content"][0] == image
