"""Semantic aliases, so a signature says what a string means (redis-py's `typing.py`)."""

from __future__ import annotations

from typing import NewType

TaskId = NewType("TaskId", str)
EntryId = NewType("EntryId", str)
StageName = NewType("StageName", str)
