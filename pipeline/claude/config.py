"""`load_settings`: the pipeline's settings, loaded and checked once at start.

The rules that need the domain (family rules and router rules name known families; with a
budget on, every price table in force prices every family) are checked by the modules that
apply them, so each rule is written once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pipeline.claude.pricing import check_prices
from pipeline.claude.routing import check_router
from pipeline.claude.settings import Settings, check_moved_settings
from pipeline.runtime.settings import load

__all__ = ["load_settings"]


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Merge defaults <- TOML (`path`, else `PIPELINE_CONFIG`) <- env <- keyword overrides.

    Env names: `REDIS_URL`, `PIPELINE_PREFIX`, and `PIPELINE_<SECTION>__<FIELD>`
    (e.g. `PIPELINE_RUNTIME__LEASE_MS=20000`).
    """
    settings = load(Settings, path, env, overrides, check_raw=check_moved_settings)
    check_router(settings)
    check_prices(settings)
    return settings
