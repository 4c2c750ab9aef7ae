"""Opening a deployment: its Redis (one node or a Cluster, found out, not configured) and its
key layout (partitions: none on one node unless asked for, `CLUSTER_PARTITIONS` on a Cluster).

Every component opens Redis here (workers, the CLI, the producer client), so that pointing
`REDIS_URL` at any node of a Cluster switches them all.
"""

from __future__ import annotations

from typing import cast

from redis.asyncio import Redis

from pipeline.runtime.errors import ConfigError
from pipeline.runtime.keys import Keys
from pipeline.runtime.redis_conn import is_cluster, open_redis
from pipeline.runtime.settings import CLUSTER_PARTITIONS, BaseSettings

__all__ = ["check_layout", "open_deployment", "partitions_for"]


def partitions_for(settings: BaseSettings, cluster: bool) -> int:
    """How many partitions the deployment has (0: none)."""
    asked = settings.redis.partitions
    if asked is None:
        return CLUSTER_PARTITIONS if cluster else 0
    if cluster and asked == 0:
        raise ConfigError(
            "redis.partitions",
            "0 on a Redis Cluster, where every hand-off must stay in one slot: leave it "
            f"unset ({CLUSTER_PARTITIONS}) or set 1 or more",
        )
    return asked


async def open_deployment(
    settings: BaseSettings, *, claim_layout: bool = False, check: bool = True
) -> tuple[Redis, Keys]:
    """The client and the keys. A Cluster client is handed on as a `Redis`: the commands the
    pipeline sends are the same, and keys are laid out so that each lies in one slot.
    The layout must be the deployment's (`check_layout`; a worker claims it; `check` off:
    any, for the command that changes it).

    Raises (as any command would) while Redis is away: wrap it in `Availability.call` to
    wait."""
    client = await open_redis(settings.redis)
    cluster = is_cluster(client)
    try:
        keys = Keys(settings.prefix, partitions=partitions_for(settings, cluster))
        if check:
            await check_layout(cast(Redis, client), keys, claim=claim_layout)
    except BaseException:
        await client.aclose()
        raise
    return cast(Redis, client), keys


async def check_layout(redis: Redis, keys: Keys, *, claim: bool = False) -> None:
    """Refuse a partition count other than the one the deployment's streams are laid out
    in: a worker reading another layout would leave tasks stranded in the old one, and the
    CLI would count the wrong streams. The first worker records its count (`claim`);
    `pipeline partitions set N` changes it once the pipeline is drained."""
    if claim:
        await redis.set(keys.layout, keys.partitions, nx=True)
    recorded = await redis.get(keys.layout)
    if recorded is not None and int(recorded) != keys.partitions:
        have = int(recorded)
        raise ConfigError(
            "redis.partitions",
            f"this deployment's streams are laid out in {have or 'no'} partitions "
            f"({keys.layout}), not {keys.partitions or 'none'}; set redis.partitions = {have}, "
            f"or drain the pipeline and run `pipeline partitions set {keys.partitions}`",
        )
