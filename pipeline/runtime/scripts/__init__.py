"""Lua scripts, loaded once from this package and registered on a client in one place."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


def _source(name: str, package: str) -> str:
    return resources.files(package).joinpath(f"{name}.lua").read_text()


def script_text(name: str, package: str = __package__) -> str:
    """A script's source, for a caller that sends it whole (`EVAL` in a pipeline)."""
    return _source(name, package)


def load(redis: Redis, name: str, *, after: str = "", package: str = __package__) -> AsyncScript:
    """One script registered on `redis`, for a module that keeps its own (dlq, flights).

    `after`: a file of shared Lua functions (e.g. `ledger_add`) the script starts with.
    `package`: where the files are (the Claude domain keeps its own scripts).
    """
    lua = _source(name, package)
    return redis.register_script((_source(after, package) + "\n" if after else "") + lua)


@dataclass(frozen=True)
class Scripts:
    """The registered scripts; each computes its SHA once and reloads itself on NOSCRIPT."""

    handoff: AsyncScript
    renew: AsyncScript
    reclaim: AsyncScript
    drain: AsyncScript
    promote: AsyncScript
    hold: AsyncScript

    @classmethod
    def register(cls, redis: Redis) -> Scripts:
        return cls(**{name: load(redis, name) for name in cls.__annotations__})
