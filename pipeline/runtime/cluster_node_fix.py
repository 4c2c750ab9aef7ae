"""A fix for redis-py's async Cluster client: idle connections are closed out of reach.

After a connection error on a node, `redis.asyncio.cluster.ClusterNode` closes that node's
idle connections (`disconnect_free_connections`), but it awaits the closing while they are
still in its free list. Another task may take one in that moment and have it closed under
its command: one more connection error, which closes the idle connections again. Under load
that feeds itself: after a primary failover a worker's every command waited on the client's
slot-map refresh for up to a minute and a half, and new connections were opened hundreds of
times a second (measured with the failover test). Taking them out of the free list while they
close ends it; they go back, closed, and reconnect on their next use as before.

Applied once, by `connect_cluster`, to the redis-py versions that have the method.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio.cluster import ClusterNode

__all__ = ["apply"]

_APPLIED = "_pipeline_closes_out_of_reach"


async def _disconnect_free_connections(self: Any) -> None:
    idle = tuple(self._free)
    self._free.clear()
    try:
        await asyncio.gather(*(conn.disconnect() for conn in idle), return_exceptions=True)
    finally:
        self._free.extend(idle)


def apply() -> None:
    """Replace `ClusterNode.disconnect_free_connections` (no-op where it does not exist, or
    once done)."""
    if not hasattr(ClusterNode, "disconnect_free_connections") or getattr(
        ClusterNode, _APPLIED, False
    ):
        return
    ClusterNode.disconnect_free_connections = _disconnect_free_connections  # type: ignore[method-assign]
    setattr(ClusterNode, _APPLIED, True)
