"""Worker subprocesses for tests that kill, signal and restart them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class WorkerProc:
    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Workers:
    """Starts `pipeline worker` subprocesses with a given environment; cleans up after.

    Every instance is remembered until it is stopped, so that `stop_leftovers` (run after
    each test by tests/conftest.py) kills what a test forgot: a worker left running would
    outlive the suite and keep polling a Redis nobody watches.
    """

    def __init__(self, env: Mapping[str, str], logdir: Path, app: str = "tests.apps:app") -> None:
        self.env = dict(env)
        self.logdir = logdir
        self.app = app
        self.procs: list[WorkerProc] = []
        _live.append(self)

    def start(self, stages: Sequence[str] = (), *, extra_env: Mapping[str, str] | None = None,
              args: Sequence[str] = ()) -> WorkerProc:  # fmt: skip
        env = {**os.environ, **self.env, **(extra_env or {})}
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
        cmd = [sys.executable, "-m", "pipeline.cli", "worker", "--app", self.app, "-v", *args]
        cmd += [a for s in stages for a in ("--stage", s)] if stages else ["--all"]
        log_path = self.logdir / f"worker-{len(self.procs)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wp = WorkerProc(proc, log_path)
        self.procs.append(wp)
        if self not in _live:  # started again after stop_all: remembered again
            _live.append(self)
        return wp

    def stop_all(self) -> None:
        for wp in self.procs:
            wp.signal(signal.SIGKILL)
        for wp in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                wp.proc.wait(10)
        with contextlib.suppress(ValueError):
            _live.remove(self)


_live: list[Workers] = []


def stop_leftovers() -> int:
    """Kill the workers of every `Workers` not stopped yet; how many were still running."""
    running = sum(wp.proc.poll() is None for w in _live for wp in w.procs)
    for workers in list(_live):
        workers.stop_all()
    return running


def wait_until(predicate: Callable[[], bool], timeout: float, every: float = 0.05,
               what: str = "condition") -> float:  # fmt: skip
    """Poll `predicate`; return the seconds it took, or fail the test on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - start
