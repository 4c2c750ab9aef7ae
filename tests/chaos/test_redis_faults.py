"""The "Shutdown is clean" guarantee: Redis faults are waited out — the fault matrix
(docs/FAULTS.md).

Each fault is put into a private redis-server while tasks flow through the four real stages
(`stages:app`: one worker process per stage plus one `--all` worker) against the fake Claude
API, and at the end we count:
  - every worker process is still alive;
  - every task Redis still held finished exactly once: one result (`completed`), one
    completion event in `<prefix>:done`, nothing in the DLQ;
  - no request was paid twice (the "Paid work is done once" guarantee: no worker process
    is killed or stalled here);
  - each worker wrote at most 3 lines about the outage (down, change of reason, back), and
    no traceback;
  - the fault reached the workers (their logs say what they waited out), and struck while
    tasks were in flight.
A Redis restarted without persistence loses what it held: of the tasks submitted before it
is killed we only count those that still finished (never twice); every task submitted after
the restart must finish exactly once.

Refused credentials are the other side of the table: the worker stops with one line and exit
code 2 instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from pipeline.fake_claude import FakeClaudeConfig, FakeClaudeServer, run_fake_claude_in_thread
from pipeline.runtime.keys import Keys
from tests.conftest import FAST
from tests.helpers.outcomes import Tally, assert_drained, tally
from tests.helpers.redis_server import (
    RedisServer,
    lower_busy_threshold,
    newest_redis_server,
    replicate_nowhere,
    run_busy_script,
    stop_replicating,
)
from tests.helpers.workers import WorkerProc, Workers, wait_until

pytestmark = pytest.mark.chaos

TASKS = 300
RATE = 40  # tasks per second the producer submits: the run lasts ~7.5 s, the fault ~5 s
LATENCY_MS = 200  # the fake Claude API's
LEASE_MS = int(FAST["PIPELINE_RUNTIME__LEASE_MS"])
PREFIX = "faults"
STAGES = ("cache-check", "router", "claude-call", "store")
STREAMS = ("tasks", "route", "call:haiku", "call:sonnet", "call:opus", "store")
#: The lines `pipeline.runtime.redis_conn.Availability` writes about an outage.
OUTAGE = ("redis unavailable at", "redis still unavailable at", "redis back at")
MAX_OUTAGE_LINES = 3
SETTLE_S = 20  # after the fault, for every task to finish (they take a few seconds)


# ---- the faults ------------------------------------------------------------------------------


@contextlib.contextmanager
def admin(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    try:
        yield client
    finally:
        client.close()


def kill_and_restart(server: RedisServer) -> None:
    """SIGKILL, 1.5 s down, started again on the same port (and data dir)."""
    server.restart(down_s=1.5)


def busy_script(server: RedisServer) -> None:
    """A script busy for 6 s; past 100 ms every other command is answered BUSY."""
    with admin(server) as client:
        lower_busy_threshold(client, 100)
    run_busy_script(server.url, 6.0)


def full_memory(server: RedisServer) -> None:
    """maxmemory just above what is used (noeviction): writes are refused (OOM) as soon as
    the flowing tasks fill it; raised (no limit) 3 s after the first refusal."""

    def refuses_writes(client: redis.Redis) -> bool:
        try:
            client.set("fault:probe", "x")
        except redis.exceptions.OutOfMemoryError:
            return True
        return False

    with admin(server) as client:
        client.config_set("maxmemory-policy", "noeviction")
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used + 64 * 1024)
        wait_until(lambda: refuses_writes(client), 15, every=0.05, what="Redis to fill up")
        time.sleep(3.0)
        client.config_set("maxmemory", 0)


def replica_for_a_while(server: RedisServer) -> None:
    """A failover seen from the old primary: `REPLICAOF` nowhere for 4 s (READONLY), then
    `REPLICAOF NO ONE`."""
    with admin(server) as client:
        replicate_nowhere(client)
        time.sleep(4.0)
        stop_replicating(client)


def client_pause(server: RedisServer) -> None:
    """`CLIENT PAUSE <2 x lease> ALL`: every command waits, leases lapse meanwhile."""
    with admin(server) as client:
        client.execute_command("CLIENT", "PAUSE", 2 * LEASE_MS, "ALL")
    time.sleep(2 * LEASE_MS / 1000)


@dataclass(frozen=True)
class Fault:
    name: str
    inject: Callable[[RedisServer], None]  # returns when the fault is over
    shows: str | None  # what some worker's log says: the fault reached the workers
    appendonly: bool = True
    loses_data: bool = False  # Redis forgets what it held: tasks submitted before it

    def __str__(self) -> str:
        return self.name


FAULTS = [
    Fault("kill-restart-empty", kill_and_restart, "recreated it at 0", appendonly=False,
          loses_data=True),
    Fault("kill-restart-aof", kill_and_restart, "cannot reach Redis"),
    Fault("busy-script", busy_script, "busy-reply-threshold"),
    Fault("maxmemory", full_memory, "at maxmemory"),
    Fault("replicaof", replica_for_a_while, "replica"),
    Fault("client-pause", client_pause, None),  # commands just wait: nothing to report
]  # fmt: skip


# ---- the run ---------------------------------------------------------------------------------


class Producer(threading.Thread):
    """Submits the tasks at RATE, each XADD retried through whatever Redis answers; with
    `hold_at`, stops before that task until `resume` is set."""

    def __init__(self, url: str, ids: list[str], hold_at: int | None) -> None:
        super().__init__(name="producer", daemon=True)
        self.url, self.ids, self.hold_at = url, ids, hold_at
        self.submitted = 0
        self.resume = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=15)
        try:
            start, paced_from = time.monotonic(), 0
            for i, task_id in enumerate(self.ids):
                if i == self.hold_at:
                    self.resume.wait(60)
                    start, paced_from = time.monotonic(), i
                time.sleep(max(0.0, start + (i - paced_from) / RATE - time.monotonic()))
                fields = {
                    "id": task_id,
                    "prompt": f"Task {i}: name a prime number above {i * 7}.",
                    "type": "classify" if i % 3 == 0 else "default",  # two lanes
                }
                self._xadd(client, fields)
                self.submitted += 1
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            client.close()

    @staticmethod
    def _xadd(client: redis.Redis, fields: dict[str, str]) -> None:
        """A producer that retries: a retried XADD that had landed is a duplicate entry
        under the same id, which the pipeline must drop."""
        deadline = time.monotonic() + 60
        while True:
            try:
                client.xadd(Keys(PREFIX).ingress, fields)  # type: ignore[arg-type]
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@dataclass
class Report:
    tally: Tally = field(repr=False)
    required: list[str]  # tasks that must have finished exactly once
    lost_window: list[str]  # submitted before a restart that lost the data
    in_flight_at_fault: int  # submitted but not finished when the fault struck
    paid: Counter[str]  # paid calls per request
    logs: dict[int, str] = field(repr=False)  # worker pid -> its log
    dead: dict[int, int | None]  # worker pid -> exit code, for workers no longer running
    leftovers: str | None  # what a stream, pending list or delayed set still holds
    phases: dict[str, float]  # seconds: workers up, until the fault, the fault, the end

    def lines_with(self, text: str) -> list[str]:
        """Every worker's log lines (above DEBUG) that contain `text`."""
        return [
            line
            for log in self.logs.values()
            for line in log.splitlines()
            if text in line and " DEBUG " not in line
        ]

    def summary(self, fault: Fault) -> str:
        survived = sum(1 for t in self.lost_window if self.tally.done[t])
        lines = {pid: len(outage_lines(log)) for pid, log in self.logs.items()}
        return (
            f"{fault}: {len(self.required)} required, "
            f"{sum(1 for t in self.required if self.tally.done[t] == 1)} finished once; "
            f"{survived}/{len(self.lost_window)} of those submitted before the data loss "
            f"finished; {self.in_flight_at_fault} in flight at the fault; "
            f"outage lines per worker {sorted(lines.values())}; "
            f"paid calls {sum(self.paid.values())} for {len(self.paid)} requests; "
            + ", ".join(f"{phase} {s:.1f}s" for phase, s in self.phases.items())
        )


def last_error(log: str) -> str:
    """The last line of `log` that names an exception (what killed the process)."""
    errors = [line.strip(" |") for line in log.splitlines() if "Error" in line]
    return errors[-1][:300] if errors else log.strip()[-300:]


def outage_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if any(phrase in line for phrase in OUTAGE)]


def worker_env(server: RedisServer, fake: FakeClaudeServer) -> dict[str, str]:
    return {
        "REDIS_URL": server.url,
        "PIPELINE_PREFIX": PREFIX,
        **FAST,
        "ANTHROPIC_BASE_URL": fake.base_url,
        "ANTHROPIC_API_KEY": "good-key",
        "PIPELINE_RATELIMIT__PROBE_MS": "1000",
    }


def start_workers(workers: Workers) -> list[WorkerProc]:
    procs = [workers.start([stage]) for stage in STAGES] + [workers.start()]
    wait_until(lambda: all(" running " in p.log() for p in procs), 60, what="workers up")
    return procs


def settled(server: RedisServer, required: list[str]) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with admin(server) as client:
                done = Counter(
                    fields[b"id"].decode() for _id, fields in client.xrange(Keys(PREFIX).done)
                )
                if any(done[t] == 0 for t in required):
                    return False
                assert_drained(client, PREFIX, STREAMS)
        except (AssertionError, redis.RedisError):
            return False
        return True

    return check


def run_with_fault(fault: Fault, server: RedisServer, tmp_path: Path) -> Report:
    """Start the workers, submit the tasks at RATE, inject the fault halfway, wait for the
    end, and count."""
    ids = [f"task-{i}" for i in range(TASKS)]
    half = TASKS // 2
    with run_fake_claude_in_thread(FakeClaudeConfig(latency_ms=LATENCY_MS)) as fake:
        workers = Workers(worker_env(server, fake), tmp_path, app="stages:app")
        try:
            clock = time.monotonic()
            phases: dict[str, float] = {}

            def phase(name: str) -> None:
                nonlocal clock
                phases[name], clock = time.monotonic() - clock, time.monotonic()

            procs = start_workers(workers)
            phase("workers up")
            producer = Producer(server.url, ids, hold_at=half if fault.loses_data else None)
            producer.start()
            wait_until(lambda: producer.submitted >= half, 30, what="half the tasks submitted")
            with admin(server) as client:
                in_flight = producer.submitted - client.xlen(Keys(PREFIX).done)
            phase("to the fault")
            fault.inject(server)
            phase("fault")
            producer.resume.set()
            producer.join(90)
            assert producer.error is None and not producer.is_alive(), producer.error
            required = ids[half:] if fault.loses_data else ids
            with contextlib.suppress(AssertionError):  # the checks below say what is missing
                wait_until(settled(server, required), SETTLE_S, every=0.2, what="the end")
            phase("to the end")
            time.sleep(1.0)  # a late duplicate would land now
            with admin(server) as client:
                counted = tally(client, PREFIX)
                try:
                    assert_drained(client, PREFIX, STREAMS)
                    leftovers = None
                except AssertionError as exc:
                    leftovers = str(exc)
            return Report(
                tally=counted,
                required=required,
                lost_window=ids[:half] if fault.loses_data else [],
                in_flight_at_fault=in_flight,
                paid=Counter(fake.stats()["calls_by_request"]),
                logs={p.pid: p.log() for p in procs},
                dead={p.pid: p.proc.poll() for p in procs if p.proc.poll() is not None},
                leftovers=leftovers,
                phases=phases,
            )
        finally:
            workers.stop_all()


@pytest.fixture(params=FAULTS, ids=str)
def fault(request: pytest.FixtureRequest) -> Fault:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def fault_server(fault: Fault, tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server for one fault: AOF with fsync always (nothing acknowledged is
    lost at a SIGKILL), or no persistence at all (`appendonly no`, `save ""`)."""
    if not newest_redis_server():
        pytest.skip("needs the redis-server binary to put faults into a server of its own")
    server = RedisServer(tmp_path / "redis", appendonly=fault.appendonly).start()
    yield server
    server.stop()


@pytest.mark.timeout(150)
def test_workers_wait_out_a_redis_fault(
    fault: Fault, fault_server: RedisServer, tmp_path: Path
) -> None:
    """A Redis fault (each one's `inject` says what it does) while 300 tasks flow through the
    four real stages is waited out: no worker dies, every task Redis still held finishes
    exactly once and is paid once, and each worker says so in at most three lines (down,
    change of reason, back), with no traceback."""
    report = run_with_fault(fault, fault_server, tmp_path)
    print(report.summary(fault))
    t = report.tally

    assert not report.dead, "workers died (exit code: last log line): " + "; ".join(
        f"{code}: {last_error(report.logs[pid])}" for pid, code in report.dead.items()
    )
    assert report.in_flight_at_fault > 0, "the fault struck after every task had finished"
    if fault.shows is not None:
        assert any(fault.shows in log for log in report.logs.values()), (
            f"no worker log mentions {fault.shows!r}: the fault never reached the workers"
        )

    missing = [task for task in report.required if t.done[task] == 0]
    assert not missing, f"{len(missing)} tasks never finished, e.g. {missing[:5]}"
    twice = {task: n for task, n in t.done.items() if n > 1}
    assert not twice, f"{len(twice)} tasks finished more than once, e.g. {list(twice.items())[:5]}"
    known = set(report.required) | set(report.lost_window)
    assert set(t.done) <= known, f"completion events for unknown ids: {set(t.done) - known}"
    not_completed = {task: t.statuses[task] for task in report.required
                     if t.statuses.get(task) != "completed"}  # fmt: skip
    assert not not_completed, f"results not completed: {list(not_completed.items())[:5]}"
    dead_lettered = {task: n for task, n in t.dlq.items() if n}
    assert not dead_lettered, f"tasks in the DLQ: {list(dead_lettered.items())[:5]}"
    assert report.leftovers is None, f"left behind: {report.leftovers}"

    for pid, log in report.logs.items():
        lines = outage_lines(log)
        assert len(lines) <= MAX_OUTAGE_LINES, f"worker {pid}: {len(lines)} outage lines:\n" + (
            "\n".join(lines[:12])
        )
        assert "Traceback" not in log, (
            f"worker {pid} logged a traceback:\n"
            + log[log.index("Traceback") - 300 : log.index("Traceback") + 2500]
        )

    # Last, so that a failure here means everything above held. The "Paid work is done once"
    # guarantee allows paid duplicates only for answers that died with a killed process and
    # calls of a process stalled past its lease; no worker process is killed or stalled here.
    paid_twice = {request_key: n for request_key, n in report.paid.items() if n > 1}
    assert not paid_twice, (
        f"{len(paid_twice)} requests were paid more than once; the workers' reclaims:\n"
        + "\n".join(report.lines_with("reclaimed"))[:3000]
    )


# ---- refused credentials: stop with one line -------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    name: str
    acl: tuple[str, ...]  # ACL SETUSER rules for the user `worker` (empty: requirepass)
    userinfo: str  # in the worker's REDIS_URL
    says: str  # the table's meaning, in the worker's one line
    needs_a_task: bool = False  # refused only once a hand-off runs

    def __str__(self) -> str:
        return self.name


REFUSALS = [
    Refusal("NOAUTH", (), "", "Redis wants a password"),
    Refusal("WRONGPASS", (), ":wrong-password", "Redis refused the user or password"),
    Refusal("NOPERM", ("~*", "&*", "+@all", "-@scripting"), "worker:worker-pw",
            "lacks a permission"),
    Refusal("NOPERM-in-script", ("~*", "&*", "+@all", "-xadd"), "worker:worker-pw",
            "lacks a permission", needs_a_task=True),
]  # fmt: skip


@pytest.mark.parametrize("refusal", REFUSALS, ids=str)
def test_refused_credentials_stop_the_worker_with_one_line(
    refusal: Refusal, private_redis: RedisServer, tmp_path: Path
) -> None:
    """Credentials or permissions Redis refuses will not fix themselves: the worker does not
    wait, it exits with code 2 and one line that says which refusal it is, no traceback.
    (NOPERM-in-script: an ACL user who may run scripts but not the XADD the hand-off script
    calls; that refusal only comes once a task is handed on.)"""
    with admin(private_redis) as client:
        if refusal.acl:
            client.execute_command("ACL", "SETUSER", "worker", "on", ">worker-pw", *refusal.acl)
        else:
            client.config_set("requirepass", "secret")
        url = private_redis.url
        if refusal.userinfo:
            url = url.replace("redis://", f"redis://{refusal.userinfo}@", 1)
        workers = Workers({"REDIS_URL": url, "PIPELINE_PREFIX": PREFIX, **FAST}, tmp_path)
        try:
            worker = workers.start()
            if refusal.needs_a_task:
                wait_until(lambda: " running " in worker.log() or worker.proc.poll() is not None,
                           30, what="the worker to start")  # fmt: skip
                client.xadd(Keys(PREFIX).ingress, {"n": "1"})
            try:
                code = worker.wait(30)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the worker kept running after {refusal}:\n{worker.log()[-2000:]}")
            log = worker.log()
        finally:
            workers.stop_all()
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert code == 2, f"exit code {code}:\n{log[-2500:]}"
    assert "Traceback" not in log, log[-2500:]
    assert len(errors) == 1, log[-2500:]
    assert refusal.says in errors[0], errors[0]
    assert "secret" not in log and "wrong-password" not in log and "worker-pw" not in log
