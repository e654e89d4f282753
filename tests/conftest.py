"""Shared pytest fixtures: real Redis servers (standalone and Cluster), throwaway certificates."""

from tests.redis_fixtures import own_redis_server, redis_cluster, redis_server
from tests.tls_fixtures import pki

__all__ = ["own_redis_server", "pki", "redis_cluster", "redis_server"]
