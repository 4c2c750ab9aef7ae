"""The four stages of the Claude pipeline, in order: cache-check -> router -> claude-call -> store.

`pipeline worker` runs `stages:app`, a factory, because claude-call has one input stream (lane)
per configured model family.
"""

from __future__ import annotations

from pipeline import App, Settings
from stages import cache_check, claude_batch, claude_call, router, store


def app(settings: Settings) -> App:
    stages = [cache_check.stage, router.stage, claude_call.stage(settings)]
    return App([*stages, claude_batch.stage(settings), store.stage])
