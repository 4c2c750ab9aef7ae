"""Paid once, under chaos: the workload, the faults and the checks of one combined run.

Shared by `tests/chaos/test_paid_once_chaos.py` (1,000 tasks) and
`benchmarks/paid_once_chaos.py` (10,000 by default). One run:

* Workers: `pipeline worker` subprocesses of `stages:app` (two per stage for cache-check,
  router and store, several for claude-call), each under a consumer name of its own, against
  the built-in fake Claude API in a thread (calls of ~1.5 s) and a real Redis.
* Workload, paced over `submit_s` seconds: distinct prompts of types `default` (routed to
  Sonnet) and `classify` (Haiku); `premium` tasks ask for Opus, but the `premium` type's daily
  budget cannot fit a single Opus call (the run's price table makes Opus 1,000x list price),
  with `budget.action = downgrade`, so they are answered by Haiku; 20% of the tasks repeat an
  earlier task's request under another id (some soon enough to coalesce, some late enough to
  hit the response cache), and half the repeats of a `premium` task are `research` tasks
  (not budgeted: answered by Opus itself) with the very same request, so that coalescing or
  caching across a budget downgrade gives a task the wrong model; 5% of the entries repeat
  an earlier entry's id and request (a producer re-submitting), soon or late.
* Faults: every `kill_every_s` for `kill_for_s` a random worker is SIGKILLed and a
  replacement started (same stages, new consumer name); then a rolling SIGTERM restart of
  every worker (replacement first, then SIGTERM the old one, whose exit is awaited in the
  background for up to `exit_wait_s`); and one claude-call worker is SIGSTOPped for twice the
  lease while it has calls in flight, then SIGCONTed.
* Checks (`Report.problems`): every id has a result and exactly one completion event, and no
  DLQ entry; every result is `completed`, and its output (`fake-claude:<request key>`) came
  from a call for its own prompt, by the model the result names and its type must get (no
  Opus call for a premium prompt); paid calls beyond one per request (one per premium task
  for a premium request) are each excused by a call whose answer was lost: hung up on by a
  killed process, held by the stalled one, or received by a killed one and not in the ledger
  (per request key, and in total); the ledger's tokens equal the fake's usage less the calls
  whose client hung up (when the ledger counts as many paid calls as clients got answers;
  else it may miss at most what the killed processes received).

Each paid call is tied to the process that made it by the fake's call log (client address,
start and end time) and the worker processes' TCP connections to the fake (`psutil`, read
every `PORT_SAMPLE_S` and when a process is signalled). A run leaves `fake_stats.json` and
`fleet.json` (every process, its fate and times) beside the worker logs for a post-mortem.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import psutil  # type: ignore[import-untyped]
import redis
from redis.asyncio import Redis as AsyncRedis

from pipeline.claude.config import load_settings
from pipeline.claude.ledger import read_days
from pipeline.claude.settings import Settings
from pipeline.fake_claude import FakeClaudeConfig, FakeClaudeServer, run_fake_claude_in_thread
from pipeline.fake_claude.stats import prompt_digest
from pipeline.runtime.keys import Keys
from tests.helpers.outcomes import assert_drained
from tests.helpers.workers import WorkerProc, Workers, wait_until

STREAMS = ("tasks", "route", "call:haiku", "call:sonnet", "call:opus", "store")
OTHER_STAGES = ("cache-check", "router", "store")
CALL_STAGE = "claude-call"
API_KEY = "chaos-key"
#: How long after a fake call ends its answer may still be unrecorded in the worker that
#: asked: a call of the stalled process that ended this long before its SIGSTOP (or later)
#: counts as held across the stall. A guess (a loaded worker may take longer); a larger one
#: only excuses more. (Answers that died with a killed process are counted by the ledger.)
ANSWER_RECORD_S = 1.0
#: How often the worker processes' connections to the fake are read.
PORT_SAMPLE_S = 0.5
#: Task types and the model family each must be answered by.
TYPE_FAMILY = {"default": "sonnet", "classify": "haiku", "premium": "haiku", "research": "opus"}
PREMIUM_MAX_TOKENS = "1000"

#: The run's config file: the `premium` type's budget ($20 a day) fits thousands of Haiku
#: calls (worst case ~$0.005 each at list price) but not one Opus call (worst case ~$25 at the
#: 1,000x price set here), so every premium task is downgraded, however many workers reserve
#: at once or die holding a reservation. `premium` answers are never cached, so a premium
#: task answered by Opus can only have shared a `research` task's call.
CONFIG_TOML = """
[budget]
action = "downgrade"
downgrade_to = "haiku"

[budget.types]
premium = 20.0

[cache.ttl_by_type]
premium = false

[[prices.tables]]
from = "2025-10-01"

[prices.tables.models.haiku]
input = 1.0
output = 5.0

[prices.tables.models.sonnet]
input = 3.0
output = 15.0

[prices.tables.models.opus]
input = 5000.0
output = 25000.0
"""


@dataclass(frozen=True)
class ChaosConfig:
    tasks: int = 1000  # distinct task ids
    submit_s: float = 40.0  # the producer spreads its entries over this long
    repeat_share: float = 0.20  # tasks whose request repeats an earlier task's
    dup_entry_share: float = 0.05  # extra entries repeating an earlier entry's id and request
    premium_share: float = 0.06  # of the tasks with a request of their own
    classify_share: float = 0.15
    call_workers: int = 3
    other_workers: int = 2  # per other stage
    latency_ms: float = 1500.0
    latency_sigma: float = 0.2
    latency_cap_ms: float = 3000.0
    # Times from the first entry sent. The SIGKILLs (every 2 s) and the rolling restart do
    # not overlap by default: a worker takes ~2.5 s of CPU to start, and on a 2-core machine
    # restarts from both at once starve everything (a new worker then needs 10-30 s).
    kill_every_s: float = 2.0
    kill_from_s: float = 2.0
    kill_for_s: float = 20.0
    stall_after_s: float = 4.0
    roll_after_s: float = 23.0
    exit_wait_s: float = 40.0  # SIGTERM: wait this long for an exit (a slow one is reported)
    ready_timeout_s: float = 60.0
    finish_timeout_s: float = 120.0  # after the producer's last entry
    seed: int = 7


# ---- the workload ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    id: str
    type: str
    prompt: str
    fields: dict[str, str]
    repeat_of: str | None = None


@dataclass(frozen=True)
class Workload:
    tasks: dict[str, Task]
    entries: list[dict[str, str]]  # in submission order, duplicates included

    @property
    def duplicate_entries(self) -> int:
        return len(self.entries) - len(self.tasks)


_WORDS = (
    "river", "engine", "market", "poem", "ledger", "orbit", "garden", "signal", "harbor",
    "winter", "theorem", "bridge", "canvas", "protein", "glacier", "lantern", "contract",
)  # fmt: skip


def make_workload(cfg: ChaosConfig, tag: str) -> Workload:
    """The tasks and the entries that carry them, in the order the producer sends them."""
    rng = random.Random(cfg.seed)
    n_repeat = round(cfg.tasks * cfg.repeat_share)
    n_own = cfg.tasks - n_repeat
    placed: list[tuple[float, dict[str, str]]] = []
    tasks: dict[str, Task] = {}
    own: list[Task] = []
    for i in range(n_own):
        roll = rng.random()
        kind = (
            "premium"
            if roll < cfg.premium_share
            else "classify"
            if roll < cfg.premium_share + cfg.classify_share
            else "default"
        )
        words = " ".join(rng.choices(_WORDS, k=6))
        prompt = f"[{tag}] task {i}: write about {words}"
        task = _task(f"t{i:05d}", kind, prompt)
        own.append(task)
        tasks[task.id] = task
        placed.append((float(i), task.fields))
    position = {task.id: float(i) for i, task in enumerate(own)}
    for j in range(n_repeat):
        first = rng.choice(own)
        kind = "research" if first.type == "premium" and rng.random() < 0.5 else first.type
        task = _task(f"r{j:05d}", kind, first.prompt, repeat_of=first.id)
        tasks[task.id] = task
        at = position[first.id] + _offset(rng, n_own)
        position[task.id] = at
        placed.append((at, task.fields))
    ids = list(tasks)
    for _ in range(round(cfg.tasks * cfg.dup_entry_share)):
        again = tasks[rng.choice(ids)]
        placed.append((position[again.id] + _offset(rng, n_own), dict(again.fields)))
    placed.sort(key=lambda p: p[0])
    return Workload(tasks, [fields for _, fields in placed])


def _task(task_id: str, kind: str, prompt: str, repeat_of: str | None = None) -> Task:
    fields = {"id": task_id, "prompt": prompt, "type": kind}
    if kind in ("premium", "research"):
        fields |= {"model": "opus", "max_tokens": PREMIUM_MAX_TOKENS}
    return Task(task_id, kind, prompt, fields, repeat_of)


def _offset(rng: random.Random, n: int) -> float:
    """Half soon after the first (in flight together), half anywhere later (after it)."""
    if rng.random() < 0.5:
        return rng.uniform(0.5, 20.0)
    return rng.uniform(20.0, max(21.0, float(n)))


# ---- the worker processes -------------------------------------------------------------------


@dataclass
class Member:
    """One worker process and what happened to it."""

    proc: WorkerProc
    stages: tuple[str, ...]
    slot: int  # its place in the fleet: a replacement takes the same
    consumer: str
    started: float  # time.time()
    ready: bool = False
    claimed_at: float | None = None  # when its consumer name was seen claimed
    state: str = "live"  # live | stalled | terminating | killed | exited
    fate: str = ""  # "killed" (SIGKILL) or "terminated" (SIGTERM)
    end_at: float | None = None  # when it was sent that signal
    ports: frozenset[int] = frozenset()  # its connections to the fake then
    stop_at: float | None = None  # SIGSTOP (the stalled one)
    cont_at: float | None = None  # SIGCONT
    stall_ports: frozenset[int] = frozenset()  # its connections to the fake when stopped
    # Every local port it was seen using towards the fake: port -> [first, last seen].
    port_seen: dict[int, list[float]] = field(default_factory=dict)
    exited_at: float | None = None
    exit_code: int | None = None
    exit_s: float | None = None  # SIGTERM -> exit
    slow_exit: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def note_ports(self, ports: frozenset[int], at: float) -> None:
        for port in ports:
            seen = self.port_seen.setdefault(port, [at, at])
            seen[1] = at

    def made(self, port: int | None, began: float) -> bool:
        """Whether a call begun then from that local port was this process's: the port was
        its (give or take the sampling interval) and it was alive."""
        seen = self.port_seen.get(port) if port is not None else None
        return (
            seen is not None
            and seen[0] - PORT_SAMPLE_S - 0.5 <= began <= seen[1] + PORT_SAMPLE_S + 0.5
            and self.started <= began <= (self.exited_at or float("inf"))
        )


_SHORT = {"cache-check": "cache", "router": "router", "claude-call": "call", "store": "store"}


class Fleet:
    """The worker processes of one run (thread-safe: the fault threads share it)."""

    def __init__(
        self, workers: Workers, client: redis.Redis, keys: Keys, fake_port: int, cfg: ChaosConfig
    ) -> None:
        self.workers = workers
        self.client = client
        self.keys = keys
        self.fake_port = fake_port
        self.cfg = cfg
        self.members: list[Member] = []
        self.lock = threading.RLock()
        self.busy_slots: set[int] = set()  # being rolled: the killer leaves them alone
        self._names = Counter[str]()
        self._watchers: list[threading.Thread] = []

    def start(self, stages: tuple[str, ...], slot: int | None = None) -> Member:
        with self.lock:
            label = "+".join(_SHORT[s] for s in stages)
            self._names[label] += 1
            consumer = f"{label}-{self._names[label]}"
            proc = self.workers.start(stages, args=["--consumer", consumer])
            slot = len({m.slot for m in self.members}) if slot is None else slot
            member = Member(proc, stages, slot, consumer, time.time())
            self.members.append(member)
            return member

    def current(self, slot: int) -> Member | None:
        """The slot's newest process still running (None while there is none)."""
        with self.lock:
            return next((m for m in reversed(self.members) if m.slot == slot and
                         m.state in ("live", "stalled")), None)  # fmt: skip

    def is_ready(self, member: Member) -> bool:
        """It has claimed its consumer name and says it is running (its signal handlers are
        in place: a SIGTERM before that kills it with status -15), or claimed it 3 s ago."""
        if member.ready or member.proc.proc.poll() is not None:
            return member.ready
        if member.claimed_at is None:
            if not self.client.exists(self.keys.worker(member.consumer)):
                return False
            member.claimed_at = time.time()
        says = f"(pid {member.pid}) running" in member.proc.log()
        member.ready = says or time.time() - member.claimed_at > 3.0
        return member.ready

    def wait_ready(self, members: list[Member]) -> float:
        """Wait until each has started (or died); return the seconds it took."""
        took = wait_until(
            lambda: all(self.is_ready(m) or m.proc.proc.poll() is not None for m in members),
            self.cfg.ready_timeout_s,
            every=0.1,
            what="workers to start",
        )
        dead = [m for m in members if not m.ready and m.state == "live"]
        if dead:
            raise AssertionError(f"worker {dead[0].consumer} died at start:\n{dead[0].proc.log()}")
        return took

    def live(self) -> list[Member]:
        with self.lock:
            return [m for m in self.members if m.state == "live"]

    def fake_ports(self, member: Member) -> frozenset[int]:
        """Local ports of the process's TCP connections to the fake API (noted as its)."""
        at = time.time()
        with contextlib.suppress(psutil.Error):
            conns = psutil.Process(member.proc.pid).net_connections(kind="tcp")
            ports = frozenset(
                c.laddr.port for c in conns if c.raddr and c.raddr.port == self.fake_port
            )
            member.note_ports(ports, at)
            return ports
        return frozenset()

    def sample_ports(self) -> None:
        """Note which process uses which connection to the fake (one system-wide read)."""
        at = time.time()
        by_pid: dict[int, set[int]] = {}
        with contextlib.suppress(psutil.Error):
            for c in psutil.net_connections(kind="tcp"):
                if c.pid and c.raddr and c.raddr.port == self.fake_port:
                    by_pid.setdefault(c.pid, set()).add(c.laddr.port)
        with self.lock:
            for member in self.members:
                if member.state in ("live", "stalled", "terminating") and member.pid in by_pid:
                    member.note_ports(frozenset(by_pid[member.pid]), at)

    def kill(self, member: Member) -> None:
        member.ports = self.fake_ports(member)
        member.end_at = time.time()
        member.state = member.fate = "killed"
        member.exited_at = member.end_at
        member.proc.kill()
        member.exit_code = member.proc.proc.returncode

    def terminate(self, member: Member) -> None:
        """SIGTERM; its exit is awaited in the background (up to `exit_wait_s`)."""
        member.ports = self.fake_ports(member)
        member.end_at = time.time()
        member.state, member.fate = "terminating", "terminated"
        member.proc.signal(signal.SIGTERM)
        watcher = threading.Thread(target=self._await_exit, args=(member,), daemon=True)
        watcher.start()
        self._watchers.append(watcher)

    def _await_exit(self, member: Member) -> None:
        try:
            member.exit_code = member.proc.wait(self.cfg.exit_wait_s)
        except Exception:  # subprocess.TimeoutExpired: slow, not wrong; stop it
            member.slow_exit = True
            member.proc.kill()
            member.exit_code = member.proc.proc.returncode
        member.exited_at = time.time()
        member.exit_s = member.exited_at - (member.end_at or 0.0)
        member.state = "exited"

    def await_exits(self) -> None:
        for watcher in list(self._watchers):
            watcher.join(self.cfg.exit_wait_s + 15)

    def stop_all(self) -> None:
        """SIGTERM every process still running and wait for them all to exit."""
        with self.lock:
            for member in self.members:
                if member.state == "stalled":
                    member.proc.signal(signal.SIGCONT)
                if member.state in ("live", "stalled") and member.proc.proc.poll() is None:
                    self.terminate(member)
        self.await_exits()


# ---- the faults -----------------------------------------------------------------------------


@dataclass
class Faults:
    kills: int = 0
    rolled: int = 0
    stalled: Member | None = None
    stall_inflight: int = 0  # the stalled process's calls in flight at the fake (just after)
    stall_fake_inflight: int = 0  # every call in flight at the fake, just before the stop
    stall_held: int = 0  # entries in the stalled consumer's pending lists
    errors: list[str] = field(default_factory=list)


class Chaos:
    """The three fault threads: killer, roller and staller (`stop` cuts them short)."""

    def __init__(
        self,
        fleet: Fleet,
        fake: FakeClaudeServer,
        lease_s: float,
        log: Callable[[str], None] = print,
    ) -> None:
        self.fleet = fleet
        self.log = log
        self.fake = fake
        self.lease_s = lease_s
        self.cfg = fleet.cfg
        self.faults = Faults()
        self.stop = threading.Event()  # tells the killer to stop
        self.sampling_done = threading.Event()
        self.rng = random.Random(self.cfg.seed + 1)
        self._threads: list[threading.Thread] = []

    def sample_ports(self) -> None:
        """Read the workers' connections to the fake every `PORT_SAMPLE_S` until stopped."""
        thread = threading.Thread(target=self._sampler, name="ports", daemon=True)
        thread.start()

    def _sampler(self) -> None:
        while not self.sampling_done.wait(PORT_SAMPLE_S):
            self.fleet.sample_ports()

    def start(self, began: float) -> None:
        for target in (self._killer, self._roller, self._staller):
            thread = threading.Thread(
                target=self._guard, args=(target, began), name=target.__name__, daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _guard(self, target: Callable[[float], None], began: float) -> None:
        try:
            target(began)
        except BaseException as exc:
            self.faults.errors.append(f"{target.__name__}: {exc!r}")

    def wait_one_shots(self, timeout: float) -> None:
        """Wait for every fault thread to finish its part."""
        for thread in self._threads:
            thread.join(timeout)

    def finish(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(60)

    def _killer(self, began: float) -> None:
        self.stop.wait(max(0.0, began + self.cfg.kill_from_s - time.time()))
        until = began + self.cfg.kill_from_s + self.cfg.kill_for_s
        while not self.stop.is_set() and time.time() < until:
            fleet = self.fleet
            with fleet.lock:
                candidates = [
                    m for m in fleet.live() if m.slot not in fleet.busy_slots and fleet.is_ready(m)
                ]
                if candidates:
                    victim = self.rng.choice(candidates)
                    fleet.kill(victim)
                    fleet.start(victim.stages, victim.slot)
                    self.faults.kills += 1
            self.stop.wait(self.cfg.kill_every_s)

    def _roller(self, began: float) -> None:
        self.stop.wait(max(0.0, began + self.cfg.roll_after_s - time.time()))
        fleet = self.fleet
        # Every slot of the fleet in turn, claude-call ones last (the stalled one among them):
        # its process then (the killer's replacement, if it was killed) is SIGTERMed once
        # its own replacement is ready.
        with fleet.lock:
            order = sorted({m.slot: m for m in fleet.members}.values(),
                           key=lambda m: (CALL_STAGE in m.stages, m.slot))  # fmt: skip
        for slot in (m.slot for m in order):

            def rollable(slot: int = slot) -> bool:
                with fleet.lock:
                    old = fleet.current(slot)
                    if old is None or old.state != "live" or not fleet.is_ready(old):
                        return False
                    fleet.busy_slots.add(slot)
                    return True

            waited = wait_until(rollable, self.lease_s * 2 + 60, every=0.1, what=f"slot {slot}")
            try:
                old = fleet.current(slot)
                assert old is not None
                new = fleet.start(old.stages, slot)
                starting = fleet.wait_ready([new])
                with fleet.lock:
                    fleet.terminate(old)
                    self.faults.rolled += 1
                self.log(f"+{time.time() - began:.1f}s: rolled {old.consumer} -> "
                         f"{new.consumer} (waited {waited:.1f}s for it, {starting:.1f}s for "
                         "the new one)")  # fmt: skip
            finally:
                fleet.busy_slots.discard(slot)

    def _staller(self, began: float) -> None:
        self.stop.wait(max(0.0, began + self.cfg.stall_after_s - time.time()))
        fleet = self.fleet
        best: list[tuple[int, Member]] = []

        def busy_caller() -> bool:
            by_peer = self.fake.stats()["inflight_by_peer"]
            with fleet.lock:
                callers = [m for m in fleet.live() if CALL_STAGE in m.stages and m.ready]
                best[:] = sorted(
                    ((_inflight(by_peer, fleet.fake_ports(m)), m) for m in callers),
                    key=lambda pair: -pair[0],
                )
            return bool(best) and best[0][0] >= 3

        with contextlib.suppress(AssertionError):
            wait_until(busy_caller, 30, every=0.2, what="a claude-call worker with calls")
        if not best:
            raise AssertionError("no live claude-call worker to stall")
        with fleet.lock:
            victim = next(
                (m for _, m in best if m.state == "live" and m.slot not in fleet.busy_slots), None
            )
            if victim is None:
                raise AssertionError("every claude-call worker died before the stall")
            self.faults.stall_fake_inflight = self.fake.state.stats.inflight
            victim.proc.signal(signal.SIGSTOP)
            victim.stop_at = time.time()
            victim.state = "stalled"
            victim.stall_ports = fleet.fake_ports(victim)
            self.faults.stalled = victim
        # Requests it wrote just before the stop may reach the fake a little later.
        seen = [0]

        def settled() -> bool:
            seen.append(_inflight(self.fake.stats()["inflight_by_peer"], victim.stall_ports))
            return len(seen) > 3

        wait_until(settled, 5, every=0.1, what="the stalled worker's calls")
        self.faults.stall_inflight = max(seen)
        self.faults.stall_held = self._held(victim.consumer)
        # Twice the lease: its entries are reclaimed meanwhile. A fixed time by definition.
        time.sleep(2 * self.lease_s)
        with fleet.lock:
            victim.proc.signal(signal.SIGCONT)
            victim.cont_at = time.time()
            victim.state = "live"
        self.log(f"+{victim.stop_at - began:.1f}s: stopped {victim.consumer} for "
                 f"{victim.cont_at - victim.stop_at:.1f}s, {self.faults.stall_inflight} calls "
                 f"in flight, {self.faults.stall_held} entries held")  # fmt: skip

    def _held(self, consumer: str) -> int:
        held = 0
        for name in STREAMS:
            if name.startswith("call:"):
                with contextlib.suppress(redis.ResponseError):
                    held += len(
                        self.fleet.client.xpending_range(
                            self.fleet.keys.stream(name), CALL_STAGE, "-", "+", 100_000, consumer
                        )
                    )
        return held


def _inflight(by_peer: Mapping[str, int], ports: frozenset[int]) -> int:
    return sum(n for peer, n in by_peer.items() if _port(peer) in ports)


def _port(peer: str | None) -> int | None:
    if not peer:
        return None
    try:
        return int(peer.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


# ---- the producer ---------------------------------------------------------------------------


def produce(
    client: redis.Redis, keys: Keys, entries: list[dict[str, str]], seconds: float
) -> float:
    """XADD the entries at an even pace over `seconds`; return when the first was sent.

    Its own connection: the fault threads use the other one meanwhile."""
    client = redis.Redis(connection_pool=client.connection_pool)
    began = time.time()
    sent = 0
    tick = threading.Event()
    while sent < len(entries):
        due = min(len(entries), int((time.time() - began) / seconds * len(entries)) + 1)
        if due > sent:
            pipe = client.pipeline(transaction=False)
            for fields in entries[sent:due]:
                pipe.xadd(keys.ingress, dict(fields))  # type: ignore[arg-type]
            pipe.execute()
            sent = due
        tick.wait(0.05)  # pacing: the schedule, not a condition
    return began


# ---- reading the outcome --------------------------------------------------------------------


@dataclass
class Report:
    """What one run did, and what it should not have."""

    tasks: int = 0
    entries: int = 0
    duplicate_ids_submitted: int = 0
    results: int = 0
    completed: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # id -> error
    lost: list[str] = field(default_factory=list)
    no_event: list[str] = field(default_factory=list)  # a result but no completion event
    done_events: int = 0
    done_twice: dict[str, int] = field(default_factory=dict)
    dlq: int = 0
    wrong: dict[str, list[str]] = field(default_factory=dict)  # reason -> ids
    cached_results: int = 0
    paid_calls: int = 0
    distinct_requests: int = 0
    repeat_calls: int = 0  # sum over request keys of (calls - 1)
    uncached_repeats: int = 0  # of those, premium tasks' own calls (never cached/coalesced)
    duplicate_paid: int = 0  # the rest: a task, or a cacheable request, paid more than once
    client_gone: int = 0
    # Answers that reached a process which was SIGKILLed before recording them: paid but
    # not in the ledger, so the ledger's shortfall of paid calls counts them.
    died_unrecorded: int = 0
    died_excuses: int = 0  # of them, what the duplicates needed (at most `died_unrecorded`)
    stalled_calls: int = 0  # calls held by the stalled process across its stop
    stalled_inflight: int = 0
    stall_fake_inflight: int = 0
    stall_held: int = 0
    shutdown_hangups: int = 0  # client_gone calls of SIGTERMed processes
    # From the workers' logs (information only): claude-call entries a live worker lost to
    # another because its lease lapsed while it held them (a worker too slow to renew is
    # stalled, as far as the lease can tell).
    leases_lost: int = 0
    gone_unattributed: int = 0
    unexcused_duplicates: dict[str, int] = field(default_factory=dict)  # request key -> n
    unexcused_detail: list[str] = field(default_factory=list)  # a few, call by call
    started_at: float = 0.0  # time.time() of the first entry; times above are from it
    fake_tokens: dict[str, int] = field(default_factory=dict)  # less client_gone calls
    gone_tokens: dict[str, int] = field(default_factory=dict)
    # Of every answer a killed process received (the most that can have died with it).
    died_tokens: dict[str, int] = field(default_factory=dict)
    ledger_tokens: dict[str, int] = field(default_factory=dict)
    ledger_requests: int = 0
    kills: int = 0
    rolled: int = 0
    slow_exits: int = 0
    unclean_exits: dict[str, int | None] = field(default_factory=dict)  # SIGTERMed, exit != 0
    opus_calls: int = 0
    drained: str = ""  # "" or what was left in the streams
    fault_errors: list[str] = field(default_factory=list)
    finish_timed_out: bool = False
    wall_s: float = 0.0

    @property
    def allowed_duplicates(self) -> int:
        return self.client_gone + self.died_unrecorded + self.stalled_calls

    def problems(self) -> list[str]:
        """The failed checks, one line each (empty: the run kept every guarantee)."""
        out: list[str] = []
        if self.lost:
            out.append(f"{len(self.lost)} tasks lost (no result), e.g. {self.lost[:5]}")
        if self.no_event:
            out.append(f"{len(self.no_event)} results without a completion event")
        if self.done_twice:
            out.append(
                f"{len(self.done_twice)} ids with more than one completion event, e.g. "
                f"{dict(list(self.done_twice.items())[:5])}"
            )
        if self.failed:
            first = next(iter(self.failed.items()))
            out.append(f"{len(self.failed)} results not completed, e.g. {first}")
        for reason, ids in sorted(self.wrong.items()):
            out.append(f"{len(ids)} results {reason}, e.g. {ids[:5]}")
        if self.duplicate_paid > self.allowed_duplicates:
            out.append(
                f"{self.duplicate_paid} duplicate paid calls > {self.allowed_duplicates} allowed "
                f"(client_gone {self.client_gone} + died unrecorded {self.died_unrecorded} "
                f"+ held by the stalled process {self.stalled_calls})"
            )
        if self.died_excuses > self.died_unrecorded:
            out.append(
                f"{self.died_excuses} duplicate paid calls follow answers a killed process "
                f"received, but the ledger misses only {self.died_unrecorded} answers: the "
                "others were recorded, and paid again"
            )
        if self.unexcused_duplicates:
            n = sum(self.unexcused_duplicates.values())
            out.append(
                f"{n} duplicate paid calls no crash or stall explains, on "
                f"{len(self.unexcused_duplicates)} requests (hang-ups by processes not killed "
                f"{self.shutdown_hangups}):\n    " + "\n    ".join(self.unexcused_detail)
            )
        if self.ledger_requests > self.paid_calls - self.client_gone:
            out.append(
                f"the ledger counts {self.ledger_requests} paid calls, more than the "
                f"{self.paid_calls - self.client_gone} answers the fake gave to a client"
            )
        low = {k: v - self.died_tokens.get(k, 0) for k, v in self.fake_tokens.items()}
        if self.died_unrecorded == 0 and self.ledger_tokens != self.fake_tokens:
            out.append(
                f"ledger tokens {self.ledger_tokens} != the fake's usage less hung-up calls "
                f"{self.fake_tokens}"
            )
        elif not all(
            low[k] <= self.ledger_tokens.get(k, 0) <= v for k, v in self.fake_tokens.items()
        ):
            out.append(
                f"ledger tokens {self.ledger_tokens} not within the fake's usage less hung-up "
                f"calls {self.fake_tokens} and that less every answer a killed process got {low}"
            )
        if self.opus_calls:
            out.append(f"{self.opus_calls} Opus calls by premium tasks over their budget")
        if self.drained:
            out.append(f"not drained: {self.drained}")
        if self.dlq:
            out.append(f"{self.dlq} DLQ entries")
        out += [f"fault injection: {e}" for e in self.fault_errors]
        return out

    def table(self) -> str:
        rows: list[tuple[str, object]] = [
            ("tasks (distinct ids)", self.tasks),
            ("entries submitted", self.entries),
            ("duplicate ids submitted", self.duplicate_ids_submitted),
            ("results", self.results),
            ("  completed", self.completed),
            ("  not completed", len(self.failed)),
            ("  served from cache/coalesced", self.cached_results),
            ("lost (no result)", len(self.lost)),
            ("completion events", self.done_events),
            ("results without an event", len(self.no_event)),
            ("ids with >1 completion", len(self.done_twice)),
            ("wrong answers", sum(len(v) for v in self.wrong.values())),
            ("DLQ entries", self.dlq),
            ("paid calls (fake)", self.paid_calls),
            ("distinct requests paid", self.distinct_requests),
            ("repeat calls, sum(n-1) by request", self.repeat_calls),
            ("  premium repeats (uncached)", self.uncached_repeats),
            ("duplicate paid calls", self.duplicate_paid),
            ("  allowed", self.allowed_duplicates),
            (
                "  narrower: client_gone + stalled in flight",
                self.client_gone + self.stalled_inflight,
            ),
            ("client_gone", self.client_gone),
            ("  of processes not killed (SIGTERMed)", self.shutdown_hangups),
            ("  not attributed to a process", self.gone_unattributed),
            ("died unrecorded (SIGKILL; paid - gone - ledger)", self.died_unrecorded),
            ("  of them, excusing a duplicate", self.died_excuses),
            (
                "stalled: calls held",
                f"{self.stalled_calls} (in flight at the stop or ended "
                f"within {ANSWER_RECORD_S}s before it)",
            ),
            ("stalled: in flight at stop", self.stalled_inflight),
            ("stalled: fake in flight (all)", self.stall_fake_inflight),
            ("stalled: entries pending", self.stall_held),
            ("claude-call leases lost (workers' logs)", self.leases_lost),
            ("unexcused duplicate calls", sum(self.unexcused_duplicates.values())),
        ]
        for name in ("input", "output", "cache_write", "cache_read"):
            rows.append(
                (
                    f"tokens {name}: ledger / fake",
                    f"{self.ledger_tokens.get(name, 0)} / {self.fake_tokens.get(name, 0)}"
                    f" (+{self.gone_tokens.get(name, 0)} hung up; killed processes got "
                    f"{self.died_tokens.get(name, 0)})",
                )
            )
        rows += [
            ("ledger paid requests", self.ledger_requests),
            ("workers SIGKILLed", self.kills),
            ("workers rolled (SIGTERM)", self.rolled),
            ("  slow exits", self.slow_exits),
            ("  exit status != 0", len(self.unclean_exits)),
            ("wall time (s)", f"{self.wall_s:.1f}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


_TOKEN_FIELDS = {
    "input": ("input_tokens",),
    "output": ("output_tokens",),
    "cache_write": ("cache_creation_input_tokens",),
    "cache_read": ("cache_read_input_tokens",),
}


def _attribute(
    report: Report, stats: Mapping[str, Any], members: list[Member], allowed: Mapping[str, int]
) -> None:
    """Tie each paid call to a process; count the duplicates no crash or stall excuses.

    Per request key, calls beyond those `allowed` must each be excused by a call whose answer
    was lost: one the client hung up on (unless a SIGTERMed process hung up: a shutdown must
    finish a call already sent), one held by the stalled process (from one of its
    connections, begun before the SIGCONT, ended at most `ANSWER_RECORD_S` before the
    SIGSTOP), or one a killed process received (from one of its connections, begun before
    the SIGKILL) and died with unrecorded. How many of the last kind there were is what the
    ledger misses (`died_unrecorded`); more of them excusing duplicates is a failure.
    """
    lost: Counter[str] = Counter()  # request key -> calls whose answer was lost for sure
    died: Counter[str] = Counter()  # request key -> answers a killed process received
    seen: dict[str, list[str]] = {}  # request key -> its calls, described
    for call in stats["calls"]:
        port, began, ended = _port(call["peer"]), call["began"], call["ended"]
        gone = bool(call["client_gone"])
        reason, owner, excuse = None, None, False
        for m in members:
            if (
                m.stop_at is not None
                and port in m.stall_ports
                and m.made(port, began)
                and began <= (m.cont_at or float("inf"))
                and ended >= m.stop_at - ANSWER_RECORD_S
            ):
                reason, owner, excuse = "held by the stalled process", m, True
                report.stalled_calls += 1
                break
            if not m.made(port, began):
                continue
            owner = m
            if m.fate == "killed" and gone:
                reason, excuse = "hung up: its process was killed", True
            elif m.fate == "killed":
                reason = "received by a process killed later"
                died[call["key"]] += 1
                for name, names in _TOKEN_FIELDS.items():
                    report.died_tokens[name] = report.died_tokens.get(name, 0) + sum(
                        call["usage"][f] for f in names
                    )
            elif gone:  # SIGTERMed (maybe later): it had to finish the call
                report.shutdown_hangups += 1
                reason = "hung up by a process not killed: NOT EXCUSED"
            break
        if reason is None and gone:
            reason, excuse = "hung up (process unknown)", True
            report.gone_unattributed += 1
        if excuse:
            lost[call["key"]] += 1
        seen.setdefault(call["key"], []).append(
            _describe_call(call, owner, reason, report.started_at)
        )
    for key, n in stats["calls_by_request"].items():
        need = n - allowed[key] - lost[key]
        if need <= 0:
            continue
        use = min(need, died[key])
        report.died_excuses += use
        if need > use:
            report.unexcused_duplicates[key] = need - use
            if len(report.unexcused_detail) < 5:
                report.unexcused_detail.append(f"{key}: " + "; ".join(seen.get(key, [])))


def _describe_call(
    call: Mapping[str, Any], owner: Member | None, reason: str | None, t0: float
) -> str:
    who = "unknown process"
    if owner is not None:
        what = [f"{owner.fate or 'running'} at +{(owner.end_at or t0) - t0:.2f}s"]
        if owner.stop_at is not None:
            what.append(f"stopped at +{owner.stop_at - t0:.2f}s")
        who = f"{owner.consumer} ({', '.join(what)})"
    return (
        f"call +{call['began'] - t0:.2f}s..+{call['ended'] - t0:.2f}s from {call['peer']} "
        f"= {who}{', client gone' if call['client_gone'] else ''}"
        f" -> {reason or 'answered (NOT EXCUSED)'}"
    )


def _check_answers(
    report: Report,
    workload: Workload,
    results: dict[str, dict[str, str]],
    stats: Mapping[str, Any],
    settings: Settings,
) -> None:
    by_tag: dict[str, list[str]] = {}
    for key in stats["calls_by_request"]:
        by_tag.setdefault(key[:12], []).append(key)
    prompts, models = stats["prompt_by_request"], stats["model_by_request"]
    wrong: dict[str, list[str]] = {}
    for task_id, result in results.items():
        if result.get("status") != "completed":
            continue
        task = workload.tasks[task_id]
        want = settings.claude.models[TYPE_FAMILY[task.type]]
        output = result.get("output", "")
        tag = output.split(" ", 1)[0].removeprefix("fake-claude:")
        keys = by_tag.get(tag, []) if output.startswith("fake-claude:") else []
        reason = None
        if not keys:
            reason = "with an output no call produced"
        elif not any(prompts.get(k) == prompt_digest(task.prompt) for k in keys):
            reason = "answering another task's prompt"
        elif not any(models.get(k) == result.get("model") for k in keys):
            reason = "labelled with a model the call did not use"
        elif result.get("model") != want:
            reason = f"of type {task.type} not answered by {want}"
        if reason:
            wrong.setdefault(reason, []).append(task_id)
    report.wrong = wrong


def collect(
    client: redis.Redis, keys: Keys, workload: Workload, stats: Mapping[str, Any],
    fleet: Fleet, faults: Faults, settings: Settings, days: list[datetime.date],
    started_at: float,
) -> Report:  # fmt: skip
    """Read results, completion events, the DLQ, the ledger and the fake's stats."""
    report = Report(
        started_at=started_at,
        tasks=len(workload.tasks),
        entries=len(workload.entries),
        duplicate_ids_submitted=workload.duplicate_entries,
    )
    ids = list(workload.tasks)
    pipe = client.pipeline(transaction=False)
    for task_id in ids:
        pipe.hgetall(keys.result(task_id))
    results: dict[str, dict[str, str]] = {}
    for task_id, raw in zip(ids, pipe.execute(), strict=True):
        if raw:
            results[task_id] = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
        else:
            report.lost.append(task_id)
    report.results = len(results)
    report.completed = sum(1 for r in results.values() if r.get("status") == "completed")
    report.failed = {
        t: r.get("error", "") for t, r in results.items() if r.get("status") != "completed"
    }
    report.cached_results = sum(1 for r in results.values() if r.get("cached") == "true")
    done: Counter[str] = Counter()
    for _id, fields in _xrange(client, keys.done, "-"):
        done[fields[b"id"].decode()] += 1
    report.done_events = sum(done.values())
    report.done_twice = {t: n for t, n in done.items() if n > 1}
    report.no_event = [t for t in ids if not done[t] and t in results]
    report.dlq = int(client.xlen(keys.dlq))
    _check_answers(report, workload, results, stats, settings)

    calls = stats["calls_by_request"]
    report.paid_calls = int(stats["succeeded"])
    report.distinct_requests = len(calls)
    allowed = _calls_allowed(stats, workload)
    report.repeat_calls = sum(n - 1 for n in calls.values())
    report.duplicate_paid = sum(max(0, n - allowed[k]) for k, n in calls.items())
    report.uncached_repeats = report.repeat_calls - report.duplicate_paid
    report.client_gone = int(stats["client_gone"])
    report.stalled_inflight = faults.stall_inflight
    report.stall_fake_inflight = faults.stall_fake_inflight
    report.stall_held = faults.stall_held
    report.opus_calls = _premium_opus_calls(stats, workload)

    usage, gone = stats["usage"], stats["usage_client_gone"]
    for name, names in _TOKEN_FIELDS.items():
        report.fake_tokens[name] = sum(usage[f] - gone[f] for f in names)
        report.gone_tokens[name] = sum(gone[f] for f in names)
    ledger = asyncio.run(_ledger_totals(settings.redis.url, keys, days))
    report.ledger_requests = ledger.pop("requests")
    report.ledger_tokens = ledger
    # The ledger counts every paid call whose answer was recorded (even a stalled worker's
    # late one): what it misses of the answers clients got died with a killed process.
    report.died_unrecorded = max(0, report.paid_calls - report.client_gone - report.ledger_requests)
    _attribute(report, stats, fleet.members, allowed)

    report.kills, report.rolled = faults.kills, faults.rolled
    report.slow_exits = sum(1 for m in fleet.members if m.slow_exit)
    report.unclean_exits = {
        m.consumer: m.exit_code
        for m in fleet.members
        if m.state == "exited" and not m.slow_exit and m.exit_code != 0
    }
    report.fault_errors = list(faults.errors)
    report.leases_lost = sum(
        _leases_lost(m.proc.log()) for m in fleet.members if CALL_STAGE in m.stages
    )
    return report


_LEASE_LOST = re.compile(r"claude-call\[\w+\]: (\d+) entries were reclaimed by other workers")


def _leases_lost(log: str) -> int:
    return sum(int(n) for n in _LEASE_LOST.findall(log))


def _calls_allowed(stats: Mapping[str, Any], workload: Workload) -> Counter[str]:
    """Calls each request key may have without any crash: one, but a premium task's request
    (downgraded: never cached, never coalesced) once per premium task that sends it."""
    premium = Counter(
        prompt_digest(t.prompt) for t in workload.tasks.values() if t.type == "premium"
    )
    prompts, models = stats["prompt_by_request"], stats["model_by_request"]
    allowed: Counter[str] = Counter()
    for key in stats["calls_by_request"]:
        uncached = "haiku" in str(models.get(key, "")) and prompts.get(key) in premium
        allowed[key] = premium[prompts[key]] if uncached else 1
    return allowed


def _premium_opus_calls(stats: Mapping[str, Any], workload: Workload) -> int:
    """Opus calls for a prompt no research task asked for: a premium task's, over budget."""
    research = {prompt_digest(t.prompt) for t in workload.tasks.values() if t.type == "research"}
    prompts, models = stats["prompt_by_request"], stats["model_by_request"]
    return sum(
        n
        for key, n in stats["calls_by_request"].items()
        if "opus" in str(models.get(key, "")) and prompts.get(key) not in research
    )


async def _ledger_totals(url: str, keys: Keys, days: list[datetime.date]) -> dict[str, int]:
    aclient = AsyncRedis.from_url(url)
    try:
        entries = await read_days(aclient, keys, days)
    finally:
        await aclient.aclose()
    out = {"input": 0, "output": 0, "cache_write": 0, "cache_read": 0, "requests": 0}
    for row in entries.rows:
        t = row.totals
        out["input"] += t.input
        out["output"] += t.output
        out["cache_write"] += t.cache_write_5m + t.cache_write_1h
        out["cache_read"] += t.cache_read
        out["requests"] += t.requests
    return out


# ---- one run --------------------------------------------------------------------------------


@contextlib.contextmanager
def chaos_fake(cfg: ChaosConfig) -> Iterator[FakeClaudeServer]:
    """The fake API: ~1.5 s calls, limits it reports in headers (none binds), no errors."""
    config = FakeClaudeConfig(
        latency_ms=cfg.latency_ms,
        latency_sigma=cfg.latency_sigma,
        latency_cap_ms=cfg.latency_cap_ms,
        rpm=10**6,
        itpm=10**9,
        otpm=10**9,
        seed=cfg.seed,
    )
    with run_fake_claude_in_thread(config) as server:
        yield server


def run_chaos(
    cfg: ChaosConfig,
    base_env: Mapping[str, str],
    workdir: Path,
    fake: FakeClaudeServer,
    log: Callable[[str], None] = print,
) -> Report:
    """One whole run: start the workers, submit under faults, wait, stop, read, check."""
    config_path = workdir / "pipeline.toml"
    config_path.write_text(CONFIG_TOML)
    env = {
        **base_env,
        "ANTHROPIC_BASE_URL": fake.base_url,
        "ANTHROPIC_API_KEY": API_KEY,
        "PIPELINE_CONFIG": str(config_path),
        # A prober that died must not hold its family up for the default 15 s.
        "PIPELINE_RATELIMIT__PROBE_MS": "1000",
        # What a shutdown may wait for a call already sent.
        "PIPELINE_CLAUDE__TIMEOUT_S": "30",
    }
    settings = load_settings(env=env)  # a bad config fails here, not in every worker
    prefix = settings.prefix
    keys = Keys(prefix)
    lease_s = settings.runtime_for(CALL_STAGE).lease_ms / 1000
    client = redis.Redis.from_url(settings.redis.url)
    workload = make_workload(cfg, prefix)
    workers = Workers(env, workdir, app="stages:app")
    fleet = Fleet(workers, client, keys, fake.port, cfg)
    chaos = Chaos(fleet, fake, lease_s, log)
    day0 = datetime.datetime.now(datetime.UTC).date()
    report: Report | None = None
    try:
        stages = [(s,) for s in OTHER_STAGES for _ in range(cfg.other_workers)]
        stages += [(CALL_STAGE,)] * cfg.call_workers
        fleet.wait_ready([fleet.start(s) for s in stages])
        chaos.sample_ports()
        log(f"{len(stages)} workers ready; submitting {len(workload.entries)} entries "
            f"({len(workload.tasks)} tasks) over {cfg.submit_s:.0f}s")  # fmt: skip
        producer = threading.Thread(
            target=produce, args=(client, keys, workload.entries, cfg.submit_s), daemon=True
        )
        began = time.time()
        producer.start()
        chaos.start(began)
        producer.join()
        log(f"+{time.time() - began:.1f}s: every entry sent")
        chaos.wait_one_shots(cfg.exit_wait_s + 120)
        chaos.finish()
        stalled = chaos.faults.stalled.consumer if chaos.faults.stalled else None
        log(f"+{time.time() - began:.1f}s: faults done: {chaos.faults.kills} kills, "
            f"{chaos.faults.rolled} rolled, stalled {stalled}")  # fmt: skip

        ids = set(workload.tasks)
        finished = _done_ids(client, keys)
        timed_out = False
        try:
            wait_until(lambda: finished.update() >= ids, cfg.finish_timeout_s, every=0.25,
                       what="every task's completion")  # fmt: skip
        except AssertionError:
            timed_out = True
        wall = time.time() - began
        log(f"+{wall:.1f}s: {len(finished.ids)} of {len(ids)} tasks completed")
        drained = ""
        try:
            wait_until(lambda: _drained(client, prefix), 30, every=0.25, what="drained streams")
        except AssertionError:
            drained = _drained_problem(client, prefix)
        fleet.stop_all()
        chaos.sampling_done.set()
        wait_until(lambda: fake.state.stats.inflight == 0, 60, every=0.1, what="no calls")
        stats = fake.stats()
        days = [day0 + datetime.timedelta(days=d) for d in range(-1, 2)]
        report = collect(client, keys, workload, stats, fleet, chaos.faults, settings, days, began)
        report.finish_timed_out = timed_out
        report.drained = drained
        report.wall_s = wall
        _dump(workdir, stats, fleet, began)
        return report
    finally:
        chaos.stop.set()
        chaos.sampling_done.set()
        for member in fleet.members:
            if member.state == "stalled":
                member.proc.signal(signal.SIGCONT)
        workers.stop_all()
        client.close()


def _dump(workdir: Path, stats: Mapping[str, Any], fleet: Fleet, t0: float) -> None:
    """The fake's stats and the fleet's history, for a post-mortem (times from the first
    entry, ports: the processes' connections to the fake when they were signalled)."""
    (workdir / "fake_stats.json").write_text(json.dumps(stats))
    members = [
        {
            "consumer": m.consumer, "stages": m.stages, "slot": m.slot, "pid": m.proc.pid,
            "log": m.proc.log_path.name, "started": m.started - t0, "fate": m.fate,
            "end_at": m.end_at and m.end_at - t0, "ports": sorted(m.ports),
            "stop_at": m.stop_at and m.stop_at - t0, "cont_at": m.cont_at and m.cont_at - t0,
            "stall_ports": sorted(m.stall_ports), "ports_seen": len(m.port_seen),
            "exited_at": m.exited_at and m.exited_at - t0, "exit_code": m.exit_code,
            "exit_s": m.exit_s,
            "slow_exit": m.slow_exit,
        }
        for m in fleet.members
    ]  # fmt: skip
    (workdir / "fleet.json").write_text(json.dumps({"t0": t0, "members": members}, indent=1))


class _DoneIds:
    """The ids seen on the done stream so far, read incrementally."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client, self.stream = client, keys.done
        self.last = "0-0"
        self.ids: set[str] = set()

    def update(self) -> set[str]:
        while True:
            batch = _xrange(self.client, self.stream, f"({self.last}", 5000)
            if not batch:
                return self.ids
            for _entry_id, fields in batch:
                self.ids.add(fields[b"id"].decode())
            self.last = batch[-1][0].decode()


def _done_ids(client: redis.Redis, keys: Keys) -> _DoneIds:
    return _DoneIds(client, keys)


Entry = tuple[bytes, dict[bytes, bytes]]


def _xrange(client: redis.Redis, stream: str, start: str, count: int | None = None) -> list[Entry]:
    return cast(list[Entry], client.xrange(stream, start, "+", count) or [])


def _drained(client: redis.Redis, prefix: str) -> bool:
    try:
        assert_drained(client, prefix, STREAMS)
    except AssertionError:
        return False
    return True


def _drained_problem(client: redis.Redis, prefix: str) -> str:
    try:
        assert_drained(client, prefix, STREAMS)
    except AssertionError as exc:
        return str(exc)
    return ""
