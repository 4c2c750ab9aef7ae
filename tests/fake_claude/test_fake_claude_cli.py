"""`python -m pipeline.fake_claude` (`run_forever`): prints its URL, stops on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pipeline.fake_claude.__main__ import config_from_args

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stop_with", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_until_signalled(stop_with: signal.Signals) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.fake_claude", "--port", "0", "--rpm", "7"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("fake-claude listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with no_proxy.open(f"{url}/_fake/config", timeout=10) as response:
            assert json.load(response)["rpm"] == 7
        process.send_signal(stop_with)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_cli_flags_for_stream_faults_and_recording() -> None:
    config = config_from_args(
        ["--stream-error-rate", "0.1", "--stream-cut-rate", "0.2", "--record-requests", "50"]
    )
    assert (config.stream_error_rate, config.stream_cut_rate) == (0.1, 0.2)
    assert config.record_requests == 50


def test_cli_flags_for_batches() -> None:
    config = config_from_args(
        ["--batch-processing-s", "0.5", "--batch-error-rate", "0.1", "--batch-expire-rate", "0.2"]
    )
    assert config.batch_processing_s == 0.5
    assert (config.batch_error_rate, config.batch_expire_rate) == (0.1, 0.2)
    assert config_from_args([]).batch_processing_s == 2.0
