"""Shared pytest fixtures: real Redis servers (standalone and Cluster) from tests.redis_fixtures."""

from tests.redis_fixtures import own_redis_server, redis_cluster, redis_server

__all__ = ["own_redis_server", "redis_cluster", "redis_server"]
