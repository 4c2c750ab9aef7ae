"""Does this Redis keep what it acknowledges? Eviction and persistence, checked (the "Shutdown
is clean" guarantee).

Two server settings lose data without an error: a `maxmemory-policy` other than `noeviction`
lets Redis delete keys under memory pressure (stream entries, results, the task records that
keep a call from being paid twice), and a server with neither AOF nor RDB save points loses
everything at a restart. `inspect_durability` reads both in one round trip; a worker logs each
finding at WARNING when it starts (`log_durability`) and keeps running; `pipeline status` shows
them.

Where the values come from: `CONFIG GET` (maxmemory-policy, maxmemory, appendonly, appendfsync,
save), else — managed Redis such as ElastiCache renames or refuses CONFIG, and an ACL user may
lack `+config` — `INFO memory` (maxmemory_policy, maxmemory) and `INFO persistence`
(aof_enabled). RDB save points are shown by CONFIG GET only: without it they are *unknown*, and
said to be, never guessed. INFO persistence also tells whether the last snapshot or AOF write
failed, which loses data as silently.

On a Redis Cluster every primary is asked (each holds its own share of the keys, and may be
set up differently): the reading shown is the primary with the most findings, and every
finding names the primaries it was found on unless all of them share it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from typing import Any, Literal

import msgspec
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ResponseError

from pipeline.runtime.redis_conn import Availability, is_cluster, redacted

log = logging.getLogger(__name__)

#: What a finding is about; stable, for scripts reading `pipeline status --json`.
FindingCode = Literal[
    "eviction",  # maxmemory-policy may evict keys
    "policy-unknown",  # maxmemory-policy could not be read at all
    "no-persistence",  # neither AOF nor RDB save points
    "persistence-unknown",  # AOF off (or unknown) and the save points unreadable
    "snapshot-failing",  # the last RDB snapshot failed
    "aof-failing",  # the last AOF write failed
]

#: CONFIG GET parameters read, one command each (Redis 6.2 takes one pattern per CONFIG GET).
CONFIG_PARAMS = ("maxmemory-policy", "maxmemory", "appendonly", "appendfsync", "save")


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    """One way this server may lose data silently: what and why, then what to do."""

    code: FindingCode
    message: str
    hint: str

    @property
    def line(self) -> str:
        """The finding as one log line: `<message>; <hint>`."""
        return f"{self.message}; {self.hint}"


class RedisDurability(msgspec.Struct, frozen=True, kw_only=True):
    """What the server says about eviction and persistence. `None`: could not be read."""

    maxmemory_policy: str | None
    maxmemory: int | None  # bytes; 0: no limit
    used_memory: int | None  # bytes
    aof_enabled: bool | None
    appendfsync: str | None  # from CONFIG GET only
    save: str | None  # RDB save points as CONFIG GET shows them ("" none); CONFIG GET only
    config_refused: str | None = None  # why CONFIG GET failed (values then come from INFO)
    findings: list[Finding] = []

    @property
    def eviction(self) -> str:
        """`maxmemory-policy noeviction (used 1.2 MiB of maxmemory 4.0 GiB)`."""
        text = f"maxmemory-policy {self.maxmemory_policy or 'unknown'}"
        used = None if self.used_memory is None else f"used {_bytes(self.used_memory)}"
        if self.maxmemory is None:
            return f"{text} ({used})" if used else text
        if not self.maxmemory:
            return f"{text} ({used}, no maxmemory)" if used else f"{text} (no maxmemory)"
        limit = f"maxmemory {_bytes(self.maxmemory)}"
        return f"{text} ({used} of {limit})" if used else f"{text} ({limit})"

    @property
    def persistence(self) -> str:
        """`AOF (appendfsync everysec) + RDB snapshots`, `none (...)`, `... unknown`."""
        rdb = {None: "RDB save points unknown", "": "no RDB save points"}.get(
            self.save, "RDB snapshots"
        )
        if self.aof_enabled:
            aof = f"AOF (appendfsync {self.appendfsync})" if self.appendfsync else "AOF"
            return f"{aof} + RDB snapshots" if self.save else aof
        if self.aof_enabled is None:
            return "unknown" if self.save is None else f"AOF unknown, {rdb}"
        if self.save == "":
            return "none (AOF off, no RDB save points)"
        if self.save is None:
            return "AOF off, RDB save points unknown"
        return "RDB snapshots only (AOF off)"


def queue_durability(pipe: Pipeline) -> int:
    """Queue the commands `parse_durability` reads on `pipe` (which must not raise on error
    replies); returns how many replies they take."""
    for name in CONFIG_PARAMS:
        pipe.config_get(name)
    pipe.info("memory")
    pipe.info("persistence")
    return len(CONFIG_PARAMS) + 2


def parse_durability(replies: list[Any]) -> RedisDurability:
    """The replies of `queue_durability`'s commands, in order: CONFIG values where the server
    gave them, INFO values where it refused, `None` where neither told."""
    config: dict[str, str] = {}
    refused: str | None = None
    for name, reply in zip(CONFIG_PARAMS, replies, strict=False):
        if isinstance(reply, dict):
            for key, value in reply.items():
                if _text(key) == name:
                    config[name] = _text(value)
        elif isinstance(reply, Exception) and refused is None:
            refused = _first_line(reply)
    memory, persistence = (
        r if isinstance(r, dict) else {} for r in replies[len(CONFIG_PARAMS) :][:2]
    )
    policy = config.get("maxmemory-policy") or _opt_text(memory.get("maxmemory_policy"))
    maxmemory = _opt_int(config.get("maxmemory"))
    if maxmemory is None:
        maxmemory = _opt_int(memory.get("maxmemory"))
    aof: bool | None = None
    if config.get("appendonly") in ("yes", "no"):
        aof = config["appendonly"] == "yes"
    elif _opt_int(persistence.get("aof_enabled")) is not None:
        aof = _opt_int(persistence.get("aof_enabled")) == 1
    found = RedisDurability(
        maxmemory_policy=policy,
        maxmemory=maxmemory,
        used_memory=_opt_int(memory.get("used_memory")),
        aof_enabled=aof,
        appendfsync=config.get("appendfsync"),
        save=config.get("save"),
        config_refused=refused,
    )
    return msgspec.structs.replace(found, findings=assess(found, persistence))


async def inspect_durability(redis: Redis) -> RedisDurability:
    """Read the server's eviction and persistence settings and judge them (one round trip).

    Refused commands are not errors (they only make values unknown); a lost connection is.
    On a Cluster, each primary in a round trip of its own (`merge_durability`).
    """
    if is_cluster(redis):
        nodes = redis.get_primaries()
        readings = await asyncio.gather(*(_inspect_node(redis, node) for node in nodes))
        return merge_durability(dict(zip((n.name for n in nodes), readings, strict=True)))
    async with redis.pipeline(transaction=False) as pipe:
        queue_durability(pipe)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    return parse_durability(replies)


async def _inspect_node(cluster: RedisCluster, node: ClusterNode) -> RedisDurability:
    """`queue_durability`'s commands sent to one node of a Cluster (which pipelines no
    keyless command), replies in the same order."""
    commands: list[Awaitable[Any]] = [
        *(cluster.config_get(name, target_nodes=node) for name in CONFIG_PARAMS),
        cluster.info("memory", target_nodes=node),
        cluster.info("persistence", target_nodes=node),
    ]
    replies: list[Any] = []
    for command in commands:
        try:
            replies.append(await command)
        except ResponseError as exc:  # refused (an ACL, a renamed CONFIG): a value unknown
            replies.append(exc)
    return parse_durability(replies)


def merge_durability(per_node: Mapping[str, RedisDurability]) -> RedisDurability:
    """Several primaries' readings as one: the values of the one with the most findings
    (the first by name of those), and every finding of any, naming the primaries it was
    found on unless every primary has it."""
    names = sorted(per_node)
    if len(names) == 1:
        return per_node[names[0]]
    worst = max(names, key=lambda name: len(per_node[name].findings))
    found_on: dict[tuple[FindingCode, str, str], list[str]] = {}
    for name in names:
        for finding in per_node[name].findings:
            found_on.setdefault((finding.code, finding.message, finding.hint), []).append(name)
    findings = [
        Finding(
            code=code,
            message=message if len(on) == len(names) else f"on {', '.join(on)}: {message}",
            hint=hint,
        )
        for (code, message, hint), on in found_on.items()
    ]
    return msgspec.structs.replace(per_node[worst], findings=findings)


async def log_durability(redis: Redis, available: Availability, url: str) -> RedisDurability | None:
    """At a worker's start: one INFO line of what the server does, one WARNING line per
    finding. Never stops the worker: a check that cannot run is logged and skipped."""
    where = redacted(url)
    try:
        found = await available.call(lambda: inspect_durability(redis))
    except Exception as exc:  # a check only; the worker runs whatever it says
        log.warning("redis at %s: could not check eviction and persistence (%s)", where,
                    _first_line(exc))  # fmt: skip
        return None
    log.info("redis at %s: %s; persistence %s", where, found.eviction, found.persistence)
    for finding in found.findings:
        log.warning("redis at %s: %s", where, finding.line)
    return found


def assess(found: RedisDurability, persistence: dict[str, Any] | None = None) -> list[Finding]:
    """The findings for what was read; `persistence` is INFO persistence (failure flags)."""
    info = persistence or {}
    findings: list[Finding] = []
    refused = f" (CONFIG GET refused: {found.config_refused})" if found.config_refused else ""
    where = "in redis.conf"
    if found.config_refused:
        where = "in redis.conf, or your provider's parameter group"
    policy = found.maxmemory_policy
    if policy is None:
        why = "neither CONFIG GET nor INFO memory shows it"
        if found.config_refused:
            why = f"CONFIG GET and INFO memory refused: {found.config_refused}"
        findings.append(Finding(
            code="policy-unknown",
            message=f"maxmemory-policy could not be read ({why})",
            hint="check that it is noeviction: any other policy may evict stream entries "
                 "and results under memory pressure",
        ))  # fmt: skip
    elif policy != "noeviction":
        if policy.startswith("allkeys-"):
            what = "stream entries and results"
        elif policy.startswith("volatile-"):
            what = "results, task records (paid-once guards) and other keys with a TTL"
        else:
            what = "keys"
        unlimited = ", once a maxmemory limit is set (none is now)" if found.maxmemory == 0 else ""
        how = "" if found.config_refused else "CONFIG SET maxmemory-policy noeviction, and "
        findings.append(Finding(
            code="eviction",
            message=f"maxmemory-policy is {policy}: Redis may evict {what} under memory "
                    f"pressure{unlimited}",
            hint=f"set it to noeviction ({how}{where})",
        ))  # fmt: skip
    loses = "a Redis restart loses every queued task, pending retry and result"
    if found.aof_enabled is not True:
        if found.save == "" and found.aof_enabled is False:
            findings.append(Finding(
                code="no-persistence",
                message=f"no persistence (AOF off, no RDB save points): {loses}",
                hint="turn AOF on (CONFIG SET appendonly yes, and appendonly yes in "
                     "redis.conf)",
            ))  # fmt: skip
        elif found.save is None or found.aof_enabled is None:
            if found.aof_enabled is False:
                known = "AOF is off and the RDB save points cannot be read"
            elif found.save == "":
                known = "there are no RDB save points and AOF cannot be read"
            else:
                known = "neither AOF nor the RDB save points can be read"
            findings.append(Finding(
                code="persistence-unknown",
                message=f"persistence unknown: {known}{refused}, so if there is none "
                        f"{loses}",
                hint=f"check AOF (appendonly yes) or RDB snapshots {where}",
            ))  # fmt: skip
    if _opt_text(info.get("rdb_last_bgsave_status")) == "err":
        findings.append(Finding(
            code="snapshot-failing",
            message="the last RDB snapshot failed (rdb_last_bgsave_status:err): writes since "
                    "the last good one are not on disk, and with stop-writes-on-bgsave-error "
                    "Redis refuses writes (MISCONF)",
            hint="see the Redis log (disk full, permissions, fork failing)",
        ))  # fmt: skip
    if found.aof_enabled and _opt_text(info.get("aof_last_write_status")) == "err":
        findings.append(Finding(
            code="aof-failing",
            message="the last AOF write failed (aof_last_write_status:err): acknowledged "
                    "writes may not be on disk",
            hint="see the Redis log (disk full, permissions)",
        ))  # fmt: skip
    return findings


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _opt_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _opt_int(value: object) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(_text(value))
    except ValueError:
        return None


def _first_line(exc: BaseException) -> str:
    """The error on one short line (Redis's "…, with args beginning with: …" left out)."""
    text = " ".join(str(exc).split()).split(", with args beginning with")[0]
    text = text or type(exc).__name__
    return text if len(text) <= 100 else text[:99] + "…"


__all__ = [
    "Finding",
    "FindingCode",
    "RedisDurability",
    "assess",
    "inspect_durability",
    "log_durability",
    "merge_durability",
    "parse_durability",
    "queue_durability",
]
