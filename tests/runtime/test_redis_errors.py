"""The table of Redis errors (`pipeline.runtime.redis_errors`) and `Availability.call`, on real
errors.

Each error is produced by a private redis-server put into the state that makes it (never a
hand-built exception where the server can make the real one), and read with the client the
workers use (`pipeline.runtime.redis_conn.connect`): redis-py turns some replies into classes of its
own and strips their codes, so only real replies show what `classify` really gets.

- `classify`: NOGROUP (from a command and from inside a script) -> recreate; OOM, READONLY,
  BUSY, LOADING and a lost connection -> wait; NOAUTH, WRONGPASS, NOPERM -> stop; BUSYGROUP
  and a syntax error -> None (a bug, raised as it is).
- `Availability.call`: waits out OOM and returns the answer once memory is freed; NOGROUP
  calls `recreate` and tries again; refused credentials raise `RedisRefused` at once; one log
  line when Redis goes away, one per change of reason, one when it is back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis
from redis.exceptions import BusyLoadingError

from pipeline.claude.settings import RedisSettings
from pipeline.runtime.redis_conn import SETTLE_S, Availability, connect
from pipeline.runtime.redis_errors import Action, RedisRefused, classify
from tests.helpers.redis_server import (
    RedisServer,
    TunedRedisServer,
    free_port,
    lower_busy_threshold,
    replicate_nowhere,
    run_busy_script,
    stop_replicating,
)

pytestmark = pytest.mark.anyio

XREADGROUP_IN_SCRIPT = "return redis.call('XREADGROUP', 'GROUP', 'g', 'c', 'STREAMS', KEYS[1], '>')"
SET_IN_SCRIPT = "return redis.call('SET', KEYS[1], 'v')"
#: What `Availability` logs about an outage (and nothing else it logs starts so).
OUTAGE = ("redis unavailable at", "redis still unavailable at", "redis back at")


# ---- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def admin(private_redis: RedisServer) -> Iterator[redis.Redis]:
    """A plain client on the private server, to put it into a fault and out again."""
    client = redis.Redis.from_url(private_redis.url)
    yield client
    client.close()


@pytest.fixture
async def client(private_redis: RedisServer, anyio_backend: str) -> AsyncIterator[Redis]:
    """The client a worker uses, on the private server."""
    conn = client_for(private_redis.url)
    yield conn
    await conn.aclose()


def client_for(url: str) -> Redis:
    return connect(RedisSettings(url=url, socket_timeout_s=10.0))


async def error_of(call: Awaitable[object]) -> Exception:
    try:
        await call
    except Exception as exc:
        return exc
    raise AssertionError("the server answered instead of refusing")


def code_of(exc: BaseException) -> str | None:
    fault = classify(exc)
    return None if fault is None else fault.code


def outage_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pipeline.runtime.redis_conn" and r.getMessage().startswith(OUTAGE)
    ]


async def until(predicate: Callable[[], bool], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.02)


def start_busy_script(url: str, seconds: float) -> threading.Thread:
    thread = threading.Thread(target=run_busy_script, args=(url, seconds), daemon=True)
    thread.start()
    return thread


def with_password(url: str, userinfo: str) -> str:
    return url.replace("redis://", f"redis://{userinfo}@", 1)


# ---- classify: errors a worker waits out, recreates after, or stops for ----------------------


async def test_nogroup_from_xreadgroup_means_recreate(client: Redis) -> None:
    """A stream or group that vanished (Redis restarted empty) is answered by recreating it."""
    exc = await error_of(client.xreadgroup("g", "c", {"gone": ">"}))
    fault = classify(exc)
    assert fault is not None and (fault.code, fault.action) == ("NOGROUP", Action.RECREATE), exc


async def test_nogroup_from_inside_a_script_means_recreate(client: Redis) -> None:
    """The hand-off, lease and reclaim scripts meet NOGROUP inside EVAL: same answer."""
    exc = await error_of(client.eval(XREADGROUP_IN_SCRIPT, 1, "gone"))
    assert "script" in str(exc), f"not a script's error: {exc}"
    assert code_of(exc) == "NOGROUP", exc


@pytest.mark.parametrize("inside", ["command", "script"])
async def test_oom_means_wait(admin: redis.Redis, client: Redis, inside: str) -> None:
    """A full Redis (maxmemory, noeviction) refuses writes until memory is freed: wait."""
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    try:
        call = client.set("k", "v") if inside == "command" else client.eval(SET_IN_SCRIPT, 1, "k")
        exc = await error_of(call)
    finally:
        admin.config_set("maxmemory", 0)
    fault = classify(exc)
    assert fault is not None and (fault.code, fault.action) == ("OOM", Action.WAIT), exc


@pytest.mark.parametrize("inside", ["command", "script"])
async def test_readonly_means_wait(admin: redis.Redis, client: Redis, inside: str) -> None:
    """A primary turned replica (a failover) refuses writes: wait for the new primary."""
    replicate_nowhere(admin)
    try:
        call = client.set("k", "v") if inside == "command" else client.eval(SET_IN_SCRIPT, 1, "k")
        exc = await error_of(call)
    finally:
        stop_replicating(admin)
    fault = classify(exc)
    assert fault is not None and (fault.code, fault.action) == ("READONLY", Action.WAIT), exc


async def test_a_blocked_read_unblocked_by_a_failover_means_wait(
    admin: redis.Redis, client: Redis
) -> None:
    """A primary turned replica also ends every blocked XREADGROUP (each worker's read loop
    blocks in one) with `UNBLOCKED ... instance state changed (master -> replica?)`: the same
    failover as READONLY, so it must be waited out too, not raised as a bug."""
    await client.xgroup_create("s", "g", id="0", mkstream=True)
    read = asyncio.ensure_future(client.xreadgroup("g", "c", {"s": ">"}, block=5000))
    await until(lambda: admin.info("clients")["blocked_clients"] == 1, 5, "the blocked read")
    replicate_nowhere(admin)
    try:
        exc = await error_of(read)
    finally:
        stop_replicating(admin)
    assert "UNBLOCKED" in str(exc), exc
    fault = classify(exc)
    assert fault is not None and fault.action is Action.WAIT, (
        f"{type(exc).__name__}({exc}) is classified {fault}: a worker raises it, not waits"
    )


async def test_busy_means_wait(
    private_redis: RedisServer, admin: redis.Redis, client: Redis
) -> None:
    """A script running past busy-reply-threshold makes every other command BUSY: wait."""
    lower_busy_threshold(admin, 100)
    busy = start_busy_script(private_redis.url, 2.0)
    try:
        exc: Exception | None = None
        deadline = time.monotonic() + 1.5
        while exc is None and time.monotonic() < deadline:
            try:
                await client.ping()
                await asyncio.sleep(0.02)
            except redis.RedisError as caught:
                exc = caught
        assert exc is not None, "PING was never refused while the script ran"
    finally:
        await asyncio.to_thread(busy.join, 5)
    fault = classify(exc)
    assert fault is not None and (fault.code, fault.action) == ("BUSY", Action.WAIT), exc


async def test_loading_means_wait(tmp_path: Path, anyio_backend: str) -> None:
    """A restarted Redis answers LOADING while it reads its dataset: wait.

    The load is slowed down (the hidden `key-load-delay`, 1 ms per key, and events served
    every KB) so that 1,000 small keys take a second to load."""
    server = TunedRedisServer(tmp_path / "redis").start()
    admin = redis.Redis.from_url(server.url)
    slow_load = {"key-load-delay": "1000", "loading-process-events-interval-bytes": "1024"}
    try:
        if not admin.config_get("key-load-delay"):
            pytest.skip("this redis-server cannot slow its load down (no key-load-delay)")
        pipe = admin.pipeline(transaction=False)
        for i in range(1000):
            pipe.set(f"k{i}", "x" * 100)
        pipe.execute()
        admin.save()
        server.kill()
        server.extra = slow_load
        server.start(wait=False)
        client = client_for(server.url)
        exc: Exception | None = None
        deadline = time.monotonic() + 10
        try:
            while exc is None and time.monotonic() < deadline:
                try:
                    await client.ping()
                    break  # loaded already: LOADING was missed
                except BusyLoadingError as caught:
                    exc = caught
                except redis.ConnectionError:
                    await asyncio.sleep(0.01)
        finally:
            await client.aclose()
        assert exc is not None, "never saw LOADING"
    finally:
        admin.close()
        server.stop()
    fault = classify(exc)
    assert fault is not None and (fault.code, fault.action) == ("LOADING", Action.WAIT), exc


async def test_lost_connection_means_wait(anyio_backend: str) -> None:
    """Nothing listening (Redis down, restarting): wait."""
    client = client_for(f"redis://127.0.0.1:{free_port()}/0")
    try:
        exc = await error_of(client.ping())
    finally:
        await client.aclose()
    fault = classify(exc)
    assert fault is not None and (fault.code, fault.action) == ("connection", Action.WAIT), exc


# The three refusals, each produced by the server: (how the server is set up, the userinfo of
# the worker's REDIS_URL, the command the worker sends).
REFUSALS = {
    "NOAUTH": ("requirepass", "", "ping"),
    "WRONGPASS": ("requirepass", ":wrong-password", "ping"),
    "NOPERM": ("acl", "limited:limited-pw", "set"),
}


def refuse(admin: redis.Redis, setup: str) -> None:
    """Make the private server refuse the worker's URL (undone when the server stops)."""
    if setup == "acl":  # a user who may PING, and nothing else
        admin.execute_command("ACL", "SETUSER", "limited", "on", ">limited-pw", "~*", "+ping")
    else:
        admin.config_set("requirepass", "secret")


async def refused_by(url: str, userinfo: str, command: str) -> Exception:
    client = client_for(with_password(url, userinfo) if userinfo else url)
    try:
        return await error_of(client.ping() if command == "ping" else client.set("k", "v"))
    finally:
        await client.aclose()


@pytest.mark.parametrize("code", list(REFUSALS))
async def test_refused_credentials_mean_stop(
    private_redis: RedisServer, admin: redis.Redis, code: str
) -> None:
    """No password, a wrong one, or an ACL user without a permission will not fix itself:
    stop, and say which of the three it is (the line tells the operator what to fix)."""
    setup, userinfo, command = REFUSALS[code]
    refuse(admin, setup)
    exc = await refused_by(private_redis.url, userinfo, command)
    fault = classify(exc)
    assert fault is not None and fault.action is Action.STOP, exc
    assert fault.code == code, f"{type(exc).__name__}({exc}) is classified {fault.code}"


async def test_a_permission_refused_inside_a_script_means_stop(
    admin: redis.Redis, private_redis: RedisServer
) -> None:
    """An ACL user who may run scripts but not a command a script calls (the hand-off's XADD)
    is refused inside EVAL: the same NOPERM, and as fatal, as outside one."""
    admin.execute_command(
        "ACL", "SETUSER", "scripter", "on", ">pw", "~*", "+@all", "-set"
    )  # fmt: skip
    client = client_for(with_password(private_redis.url, "scripter:pw"))
    try:
        exc = await error_of(client.eval(SET_IN_SCRIPT, 1, "k"))
    finally:
        await client.aclose()
    fault = classify(exc)
    assert fault is not None and (fault.code, fault.action) == ("NOPERM", Action.STOP), (
        f"{type(exc).__name__}({exc}) is classified {fault}"
    )


async def test_busygroup_and_a_syntax_error_are_not_faults(client: Redis) -> None:
    """Errors no wait can fix are bugs or bad commands: classify says None (raise them)."""
    await client.xgroup_create("s", "g", id="0", mkstream=True)
    busygroup = await error_of(client.xgroup_create("s", "g", id="0"))
    syntax = await error_of(client.execute_command("SET", "k", "v", "NOSUCHOPTION"))
    assert "BUSYGROUP" in str(busygroup), busygroup
    assert classify(busygroup) is None, busygroup
    assert classify(syntax) is None, syntax


# ---- Availability.call -----------------------------------------------------------------------


async def test_availability_waits_out_oom_and_returns_the_answer(
    private_redis: RedisServer,
    admin: redis.Redis,
    client: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A write refused for OOM is tried again until memory is freed, then its answer is
    returned: two log lines (down, back) however many tries it took."""
    caplog.set_level(logging.WARNING, logger="pipeline.runtime.redis_conn")
    available = Availability(private_redis.url, max_backoff_s=0.2)
    tries = 0

    async def write() -> object:
        nonlocal tries
        tries += 1
        return await client.set("k", "v")

    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    call = asyncio.ensure_future(available.call(write))
    await until(lambda: available.down, 5, "the call to see OOM")
    await asyncio.sleep(1.0)
    assert not call.done(), "the call gave up while Redis was full"
    admin.config_set("maxmemory", 0)
    assert await asyncio.wait_for(call, 5) is True
    assert admin.get("k") == b"v"
    assert tries >= 4, f"only {tries} tries in a second: no backoff loop?"
    await asyncio.sleep(SETTLE_S + 0.2)  # "back" is said once it has held a moment
    lines = outage_lines(caplog)
    assert len(lines) == 2, lines
    assert lines[0].startswith("redis unavailable at") and "maxmemory" in lines[0], lines
    assert lines[1].startswith("redis back at"), lines


async def test_availability_logs_once_per_change_of_reason(
    private_redis: RedisServer,
    admin: redis.Redis,
    client: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """OOM, then READONLY, then healthy: three lines (down, now another reason, back), not
    one per try."""
    caplog.set_level(logging.WARNING, logger="pipeline.runtime.redis_conn")
    available = Availability(private_redis.url, max_backoff_s=0.1)
    tries = 0

    async def write() -> object:
        nonlocal tries
        tries += 1
        return await client.set("k", "v")

    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    call = asyncio.ensure_future(available.call(write))
    try:
        await until(lambda: available.down, 5, "the call to see OOM")
        await asyncio.sleep(0.5)
        replicate_nowhere(admin)  # a replica ignores maxmemory: now READONLY
        admin.config_set("maxmemory", 0)
        await until(lambda: len(outage_lines(caplog)) >= 2, 5, "the change of reason")
        await asyncio.sleep(0.5)
    finally:
        stop_replicating(admin)
        admin.config_set("maxmemory", 0)
    assert await asyncio.wait_for(call, 5) is True
    assert tries >= 6, tries
    await asyncio.sleep(SETTLE_S + 0.2)
    lines = outage_lines(caplog)
    assert len(lines) == 3, lines
    down, changed, back = lines
    assert down.startswith("redis unavailable at") and "maxmemory" in down, lines
    assert changed.startswith("redis still unavailable at") and "replica" in changed, lines
    assert back.startswith("redis back at"), lines
    assert "secret" not in " ".join(lines)


async def test_availability_waits_out_a_restart(
    private_redis: RedisServer, client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis killed and started again: the call waits, then answers; down and back, two lines."""
    caplog.set_level(logging.WARNING, logger="pipeline.runtime.redis_conn")
    available = Availability(private_redis.url, max_backoff_s=0.2)
    await client.set("k", "v")
    private_redis.kill()
    call = asyncio.ensure_future(available.call(lambda: client.get("k")))
    await until(lambda: available.down, 5, "the call to see the server gone")
    await asyncio.to_thread(private_redis.start)
    assert await asyncio.wait_for(call, 10) == b"v"  # appendonly: the key survived
    await asyncio.sleep(SETTLE_S + 0.2)
    lines = outage_lines(caplog)
    assert [line.split(" at ")[0] for line in lines] == ["redis unavailable", "redis back"], lines
    assert "cannot reach Redis" in lines[0], lines


@pytest.mark.parametrize("where", ["command", "script"])
async def test_availability_recreates_after_nogroup_and_tries_again(
    private_redis: RedisServer, admin: redis.Redis, client: Redis, where: str
) -> None:
    """NOGROUP with `recreate` given: recreate once, then the retried read answers (and the
    entry XADDed before the group existed is read: the group is created at 0)."""
    available = Availability(private_redis.url)
    admin.xadd("s", {"n": "1"})
    recreated = 0

    async def recreate() -> None:
        nonlocal recreated
        recreated += 1
        await client.xgroup_create("s", "g", id="0", mkstream=True)

    def read() -> Awaitable[object]:
        if where == "command":
            return client.xreadgroup("g", "c", {"s": ">"}, count=10)
        return client.eval(XREADGROUP_IN_SCRIPT, 1, "s")

    reply = await available.call(read, recreate)
    assert recreated == 1
    assert b"n" in repr(reply).encode(), reply


async def test_availability_raises_nogroup_it_cannot_fix(
    private_redis: RedisServer, client: Redis
) -> None:
    """Without `recreate`, NOGROUP is raised; with one that does not help, raised after 3."""
    available = Availability(private_redis.url)
    with pytest.raises(redis.ResponseError, match="NOGROUP"):
        await available.call(lambda: client.xreadgroup("g", "c", {"s": ">"}))
    recreated = 0

    async def useless() -> None:
        nonlocal recreated
        recreated += 1

    with pytest.raises(redis.ResponseError, match="NOGROUP"):
        await available.call(lambda: client.xreadgroup("g", "c", {"s": ">"}), useless)
    assert recreated == 3


@pytest.mark.parametrize("code", list(REFUSALS))
async def test_availability_raises_refused_credentials_at_once(
    private_redis: RedisServer, admin: redis.Redis, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused credentials raise `RedisRefused` on the first try, naming what is wrong
    (the table's meaning for that refusal) and never the password."""
    caplog.set_level(logging.WARNING, logger="pipeline.runtime.redis_conn")
    setup, userinfo, command = REFUSALS[code]
    refuse(admin, setup)
    url = with_password(private_redis.url, userinfo) if userinfo else private_redis.url
    worker_client = client_for(url)
    available = Availability(url)
    tries = 0

    async def op() -> object:
        nonlocal tries
        tries += 1
        return await (worker_client.ping() if command == "ping" else worker_client.set("k", "v"))

    try:
        with pytest.raises(RedisRefused) as refused:
            await asyncio.wait_for(available.call(op), 5)
    finally:
        await worker_client.aclose()
    assert tries == 1
    assert not outage_lines(caplog), "a refusal was waited on as an outage"
    message = str(refused.value)
    meanings = {
        "NOAUTH": "wants a password",
        "WRONGPASS": "refused the user or password",
        "NOPERM": "lacks a permission",
    }
    assert meanings[code] in message, message
    for secret in ("wrong-password", "limited-pw"):
        assert secret not in message, message


async def test_availability_raises_unknown_errors_at_once(client: Redis) -> None:
    """A bad command is a bug, not an outage: raised on the first try, never retried."""
    available = Availability("redis://127.0.0.1:1/0")
    tries = 0

    async def bad() -> object:
        nonlocal tries
        tries += 1
        return await client.execute_command("SET", "k", "v", "NOSUCHOPTION")

    with pytest.raises(redis.ResponseError, match="syntax"):
        await available.call(bad)
    assert tries == 1
