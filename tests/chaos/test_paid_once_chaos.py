"""Paid once and answered for itself, with everything going wrong at once (the "Paid work is
done once" guarantee).

1,000 tasks through the four real stages (worker subprocesses) and the fake Claude API, with
repeated prompts, re-submitted ids and budget-downgraded tasks, while a worker is SIGKILLed
every 2 s, every worker is restarted by SIGTERM in turn and a claude-call worker is stopped
for twice its lease. The run and its checks live in `tests/helpers/paid_once_chaos.py`, which
`benchmarks/paid_once_chaos.py` runs at 10,000 tasks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.paid_once_chaos import ChaosConfig, chaos_fake, run_chaos

pytestmark = pytest.mark.chaos


@pytest.mark.timeout(175)
@pytest.mark.parametrize("tasks", [1000])
def test_every_task_is_paid_once_and_answered_for_itself_under_chaos(
    tasks: int, fast_env: dict[str, str], tmp_path: Path
) -> None:
    cfg = ChaosConfig(tasks=tasks)
    with chaos_fake(cfg) as fake:
        report = run_chaos(cfg, fast_env, tmp_path, fake)
    print(report.table())
    problems = report.problems()
    for line in problems:
        print(f"FAILED: {line}")
    assert not problems, "\n".join(problems)
