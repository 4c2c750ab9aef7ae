"""A worker process: one or more stages (and their lanes), signals, consumer name, shutdown.

The "Shutdown is clean" guarantee: SIGTERM/SIGINT stop reading, in-flight entries finish or are
handed back within the grace period, and the process exits 0. A second signal cuts the grace
period short.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import msgspec

from pipeline.claude.cache import looks_up
from pipeline.claude.settings import Settings
from pipeline.runtime.context import WorkerContext
from pipeline.runtime.deployment import open_deployment
from pipeline.runtime.errors import ConfigError
from pipeline.runtime.hooks import Hook, Hooks
from pipeline.runtime.keys import Keys
from pipeline.runtime.partitions import IngressMover, ResultPublisher
from pipeline.runtime.redis_conn import Availability, redacted, server_version
from pipeline.runtime.redis_durability import log_durability
from pipeline.runtime.redis_errors import RedisRefused
from pipeline.runtime.replication import Replication
from pipeline.runtime.retry import RetryPolicy
from pipeline.runtime.runner import StageRunner
from pipeline.runtime.scripts import Scripts
from pipeline.runtime.services import Services
from pipeline.runtime.stage import App, Stage

if TYPE_CHECKING:
    from observability.tracing import Tracing

log = logging.getLogger(__name__)


def load_app(spec: str, settings: Settings) -> App:
    """Import `module:attribute` (default `app`): an App, or a factory `(Settings) -> App`.

    A factory lets an App depend on configuration (claude-call's lanes are the configured
    model families).
    """
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:  # like uvicorn: apps in the working directory import
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError("app", f"cannot import {module_name!r}: {exc}") from None
    app = getattr(module, attr or "app", None)
    if callable(app) and not isinstance(app, App):
        app = app(settings)
    if not isinstance(app, App):
        raise ConfigError("app", f"{spec!r} is not a pipeline App (or a factory of one)")
    return app


async def claim_consumer_name(
    ctx_redis: object,
    keys: Keys,
    scripts: Scripts,
    base: str,
    token: str,
    ttl_ms: int,
    available: Availability,
    exact: bool,
) -> str:
    """The lowest free `<base>-<n>`: stable across restarts on one host, unique among live ones."""
    candidates = [base] if exact else [f"{base}-{n}" for n in range(10_000)]
    for name in candidates:
        got = await available.call(
            partial(scripts.hold, keys=[keys.worker(name)], args=[token, ttl_ms])
        )
        if got:
            return name
    raise ConfigError("consumer", f"consumer name {base!r} is held by another live worker")


async def run_worker(
    app: App,
    stage_names: Sequence[str],
    settings: Settings,
    *,
    concurrency: int | None = None,
    consumer: str | None = None,
    lanes: Sequence[str] = (),
    hooks: Sequence[Hook] = (),
    ready: asyncio.Event | None = None,
    metrics_port: int | None = None,
    partitions: Sequence[int] = (),
) -> None:
    """Run the named stages of `app` until SIGTERM/SIGINT (or `ctx.stopping`).

    `metrics_port` (else `[metrics] port`) serves Prometheus scrapes (docs/OBSERVABILITY.md).
    `lanes` limits laned stages to those lanes (all when empty); `partitions` limits a
    partitioned deployment's stages to those partitions (all when empty). `hooks` observe the worker
    (the one seam); tracing is one of them: the `OTEL_*` variables or a `TracerProvider` the
    application set turn it on, unless `hooks` already hold a tracer.
    """
    stages = [app.stage(name) for name in stage_names]
    # Back off no longer than a quarter lease while Redis is away, so that owners renew
    # their leases soon after it is back, before reclaims resume (scripts/reclaim.lua).
    shortest_lease_s = min(settings.runtime_for(s.name).lease_ms for s in stages) / 1000
    available = Availability(settings.redis.url, max_backoff_s=min(5.0, shortest_lease_s / 4))
    service = f"pipeline-{stages[0].name}" if len(stages) == 1 else "pipeline-worker"
    tracing = None if Hooks(hooks).tracer else _start_tracing(app, Keys(settings.prefix), service)
    # (before connecting: a bad OTEL_* fails at once)
    log.info("connecting to %s", redacted(settings.redis.url))
    redis, keys = await available.call(lambda: open_deployment(settings, claim_layout=True))
    served = _served_partitions(keys, partitions)
    laned = [
        (stage, lane)
        for stage in stages
        for lane in (stage.lanes or (None,))
        if lane is None or not lanes or lane in lanes
    ]
    if keys.partitions:
        # One blocking read per (stage, lane, partition), ingress mover and publisher, each
        # holding a connection for up to block_ms: room for them on top of `max_connections`
        # (else, with 16 partitions, reads starve everything else: a Cluster client refuses
        # past its limit per node, a one-node pool makes callers wait).
        readers = len(laned) * len(served) + len(served) + (app.stages[0] in stages)
        more = msgspec.structs.replace(
            settings.redis, max_connections=settings.redis.max_connections + readers
        )
        await redis.aclose()
        redis, keys = await available.call(
            lambda: open_deployment(msgspec.structs.replace(settings, redis=more))
        )
        served = _served_partitions(keys, partitions)
    scripts = Scripts.register(redis)
    replication = Replication(redis, keys.prefix, settings.redis, available)
    version = await available.call(lambda: server_version(redis))
    token = uuid.uuid4().hex
    hold_ms = max(30_000, settings.runtime.lease_ms * 2)
    name = await claim_consumer_name(
        redis,
        keys,
        scripts,
        consumer or socket.gethostname(),
        token,
        hold_ms,
        available,
        exact=consumer is not None,
    )
    from observability.metrics_export import start_metrics

    port = settings.metrics.port if metrics_port is None else metrics_port
    metrics = start_metrics(
        settings, redis, keys, app, port=port, service_name=service,
        looked_up=partial(looks_up, settings),
    )  # fmt: skip
    hooks = [
        *hooks,
        *([tracing] if tracing else []),
        *([metrics.metrics.hook()] if metrics else []),
    ]
    ctx = WorkerContext(
        app=app,
        settings=settings,
        redis=redis,
        scripts=scripts,
        keys=keys,
        consumer=name,
        available=available,
        retry_policy=RetryPolicy.from_settings(settings.retry),
        hooks=Hooks(hooks),
        replication=replication if replication.enabled else None,
        has_xackdel=version >= (8, 2),
    )
    services = Services(settings, redis, keys, available, ctx.hooks, ctx.replication)
    handlers = {
        stage.name: stage.handler or await stage.build(services)  # type: ignore[misc]
        for stage in stages
    }
    _quiet_gc()
    runners = [
        StageRunner(
            stage,
            lane,
            ctx,
            _concurrency(settings, stage, concurrency),
            handlers[stage.name],
            part,
        )
        for stage, lane in laned
        for part in served
    ]
    # With partitions: the ingress is moved into them beside the first stage, and every
    # worker publishes the results of the partitions it serves.
    movers: list[IngressMover | ResultPublisher] = []
    if keys.partitions:
        if app.stages[0] in stages:
            movers.append(IngressMover(ctx, keys, app.stages[0].stream))
        movers += [ResultPublisher(ctx, part) for part in served]
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    signals = 0
    forced_exit = False

    def force_exit() -> None:
        """Last resort (e.g. Redis gone during shutdown): entries stay pending, leases lapse.
        Not while paid calls already sent may still finish (their own bound, plus 10 s)."""
        nonlocal forced_exit
        finishing = max((r.finish_deadline() for r in runners), default=0.0) - time.monotonic()
        if finishing > 0 and not ctx.forced:
            loop.call_later(finishing + 10, force_exit)
            return
        forced_exit = True
        log.error("shutdown did not finish within the grace period; exiting, held entries "
                  "will be reclaimed by other workers when their lease lapses")  # fmt: skip
        if main is not None:
            main.cancel()

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.warning(
                "%s received: stopping (grace %.0fs)",
                signal.Signals(signum).name,
                settings.runtime.grace_s,
            )
            ctx.stopping.set()
            for runner in runners:
                runner.wake()
            loop.call_later(settings.runtime.grace_s + 10, force_exit)
        else:
            log.warning("second signal: handing back in-flight entries now")
            ctx.forced = True
            for runner in runners:
                runner.wake()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    log.info(
        "worker %s (pid %d) running %s on Redis %s",
        name,
        os.getpid(),
        ", ".join(r.name for r in runners),
        ".".join(map(str, version)),
    )
    await log_durability(redis, available, settings.redis.url)  # eviction, persistence: loudly
    try:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_hold_name(ctx, token, hold_ms))
                if metrics is not None:
                    tg.create_task(metrics.run())
                tasks = [tg.create_task(r.run(), name=r.name) for r in runners]
                tasks += [tg.create_task(m.run()) for m in movers]
                if ready is not None:
                    ready.set()
                await asyncio.gather(*tasks)
                raise _Done
        except* _Done:
            pass
        except* RedisRefused as refused:  # one clear line (cli.main), not a traceback group
            first: BaseException = refused
            while isinstance(first, BaseExceptionGroup):  # runners nest task groups
                first = first.exceptions[0]
            raise first from None
    except asyncio.CancelledError:
        if not forced_exit:
            raise
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await services.aclose()
        await replication.aclose()
        if tracing is not None:
            await asyncio.to_thread(tracing.shutdown)  # flushes the last spans
        if metrics is not None:
            await asyncio.to_thread(metrics.shutdown)
        try:
            await redis.delete(keys.worker(name))
        except Exception as exc:  # the name expires by itself anyway
            log.debug("could not release consumer name: %r", exc)
        await redis.aclose()
    if not forced_exit:
        log.info("worker %s stopped cleanly", name)


def _start_tracing(app: App, keys: Keys, service: str) -> Tracing | None:
    """Tracing when the `OTEL_*` variables ask for it or the application set a provider;
    only then is OpenTelemetry imported by us."""
    from observability import require_tracing, tracing_enabled

    if not tracing_enabled(os.environ):
        return None
    require_tracing()
    from observability.tracing import start_tracing

    return start_tracing(app, keys, service)


def _served_partitions(keys: Keys, wanted: Sequence[int]) -> list[Keys]:
    """The partitions this worker serves: `wanted` (all when empty); without partitions,
    the one unpartitioned layout."""
    if not keys.partitions:
        if wanted:
            raise ConfigError("partitions", "this deployment has none (redis.partitions)")
        return [keys]
    unknown = sorted(set(wanted) - set(range(keys.partitions)))
    if unknown:
        raise ConfigError(
            "partitions", f"{unknown} not among the deployment's 0-{keys.partitions - 1}"
        )
    return [keys.of_partition(p) for p in sorted(set(wanted))] or keys.each_partition()


def _concurrency(settings: Settings, stage: Stage, cli: int | None) -> int:
    """--concurrency, else `[stages.<name>] concurrency`, else the stage's own, else global."""
    if cli:
        return cli
    if "concurrency" in settings.stages.get(stage.name, {}):
        return settings.runtime_for(stage.name).concurrency
    return stage.concurrency or settings.runtime.concurrency


def _quiet_gc() -> None:
    """Keep full garbage collections off the event loop's critical path.

    With thousands of calls in flight, full collections of a young heap took up to 0.5 s
    each (measured: loop lag p99 ~450 ms). Freezing what start-up allocated and collecting
    the young generation less often brought lag p99 under 50 ms (benchmarks/claude_call.py).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


class _Done(Exception):
    """Ends the task group once every stage has shut down (stops the name keeper)."""


async def _hold_name(ctx: WorkerContext, token: str, hold_ms: int) -> None:
    while True:
        await asyncio.sleep(hold_ms / 3000)
        ok = await ctx.available.call(
            lambda: ctx.scripts.hold(keys=[ctx.keys.worker(ctx.consumer)], args=[token, hold_ms])
        )
        if not ok and not ctx.stopping.is_set():
            log.error("consumer name %s was taken by another process; stopping", ctx.consumer)
            ctx.stopping.set()
