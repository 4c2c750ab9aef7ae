"""What every `pipeline` sub-command shares: options, consoles, settings, one Redis
connection per command (one node or a Cluster, and the deployment's keys) and running a
coroutine (on uvloop when installed)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from redis.asyncio import Redis
from rich.console import Console

from pipeline.claude.config import load_settings
from pipeline.claude.settings import Settings
from pipeline.runtime.errors import RedisUnavailable
from pipeline.runtime.keys import Keys

_T = TypeVar("_T")

out = Console(soft_wrap=False)
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional on 3.11
    typer.Option(
        "--config",
        "-c",
        help="TOML config file (else $PIPELINE_CONFIG).",
        envvar="PIPELINE_CONFIG",
        show_envvar=False,
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print JSON (typed: numbers, booleans) instead of a table.")
]
AppOpt = Annotated[
    str, typer.Option("--app", help="module:attribute of the App whose stages to look at.")
]


def settings_from(config: Path | None) -> Settings:
    return load_settings(config)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_async(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run one coroutine to its answer (on uvloop when installed)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


@contextlib.asynccontextmanager
async def connection(
    settings: Settings, *, check_layout: bool = True
) -> AsyncIterator[tuple[Redis, Keys]]:
    """A connection for one command and the deployment's keys (`open_deployment`: a Cluster
    found out, its partitions, checked against the recorded layout unless `check_layout` is
    off); Redis being away becomes one line naming the URL."""
    from pipeline.runtime.deployment import open_deployment
    from pipeline.runtime.redis_conn import UNAVAILABLE, redacted

    def unavailable(exc: BaseException) -> RedisUnavailable:
        where = redacted(settings.redis.url)
        return RedisUnavailable(f"cannot reach Redis at {where}: {exc}")

    try:
        redis, keys = await open_deployment(settings, check=check_layout)
    except UNAVAILABLE as exc:
        raise unavailable(exc) from exc
    try:
        yield redis, keys
    except UNAVAILABLE as exc:
        raise unavailable(exc) from exc
    finally:
        await redis.aclose()
