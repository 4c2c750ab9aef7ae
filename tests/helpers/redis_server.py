"""The tests use the same private redis-server as the demo and the benchmarks."""

from pipeline.embedded_redis import RedisServer, free_port, newest_redis_server

__all__ = ["RedisServer", "free_port", "newest_redis_server"]
