"""Four chained stages with trivial handlers: what the runtime itself costs per entry."""

from __future__ import annotations

from pipeline import App, Complete, Forward, Message, Outcome, Stage


async def s1(msg: Message) -> Outcome:
    return Forward("s2", {"n": msg.fields.get("n", "")})


async def s2(msg: Message) -> Outcome:
    return Forward("s3", msg.body(dict))


async def s3(msg: Message) -> Outcome:
    return Forward("s4", msg.body(dict))


async def s4(msg: Message) -> Outcome:
    return Complete({"status": "completed", "output": msg.body(dict)["n"]})


app = App(
    [
        Stage("s1", "tasks", s1),
        Stage("s2", "s2", s2),
        Stage("s3", "s3", s3),
        Stage("s4", "s4", s4),
    ]
)
