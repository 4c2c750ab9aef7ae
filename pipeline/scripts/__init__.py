"""Lua scripts, loaded once from this package and registered on a client in one place."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


def _source(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.lua").read_text()


def load(redis: Redis, name: str, *, after: str = "") -> AsyncScript:
    """One script registered on `redis`, for a module that keeps its own (flights, budget).

    `after`: a file of shared Lua functions (e.g. `ledger_add`) the script starts with.
    """
    return redis.register_script((_source(after) + "\n" if after else "") + _source(name))


@dataclass(frozen=True)
class Scripts:
    """The registered scripts; each computes its SHA once and reloads itself on NOSCRIPT."""

    handoff: AsyncScript
    renew: AsyncScript
    reclaim: AsyncScript
    drain: AsyncScript
    promote: AsyncScript
    hold: AsyncScript
    ratelimit: AsyncScript

    @classmethod
    def register(cls, redis: Redis) -> Scripts:
        return cls(**{name: redis.register_script(_source(name)) for name in cls.__annotations__})
