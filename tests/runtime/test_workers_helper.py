"""The test helper that starts workers kills what a test leaves running, also a worker
started again after `stop_all` (one such was left polling after the suite)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.redis_server import free_port
from tests.helpers.workers import Workers, stop_leftovers


def test_a_worker_started_again_after_stop_all_is_still_cleaned_up(tmp_path: Path) -> None:
    # Nothing listens there: the workers wait for Redis, running, until killed.
    env = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "PIPELINE_PREFIX": "leftover"}
    workers = Workers(env, tmp_path)
    workers.start()
    workers.stop_all()
    again = workers.start()
    assert again.proc.poll() is None
    assert stop_leftovers() == 1
    assert again.proc.poll() is not None
