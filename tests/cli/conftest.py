"""The environment `pipeline` subprocesses run with in these tests."""

from __future__ import annotations

import os

import pytest


def cli_env(redis_url: str, prefix: str) -> dict[str, str]:
    """The test's Redis and prefix, no other PIPELINE_* setting, and a wide terminal."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    return {**clean, "REDIS_URL": redis_url, "PIPELINE_PREFIX": prefix, "COLUMNS": "200"}


@pytest.fixture
def env(redis_url: str, prefix: str) -> dict[str, str]:
    return cli_env(redis_url, prefix)
