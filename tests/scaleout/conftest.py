"""Fixtures of the scale-out tests: a real redis-server and a real Redis Cluster (3 masters,
started from the same binary), shared by several ``aleatoria serve`` instances."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_server import redis_binary as redis_binary
from redis_server import redis_server as redis_server
from redis_server import started
from scaleout_support import RedisCluster


@pytest.fixture(scope="session")
def redis_cluster(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A Redis Cluster of 3 masters (no replicas) for the whole session; tests flush it."""
    cluster = RedisCluster(redis_binary, tmp_path_factory.mktemp("cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["redis", "cluster"])
def shared_redis(request: pytest.FixtureRequest, redis_binary: str, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty shared Redis: a single redis-server, or the Redis Cluster."""
    if request.param == "redis":
        with started(redis_binary, tmp_path) as server:
            yield server.url
        return
    cluster: RedisCluster = request.getfixturevalue("redis_cluster")
    cluster.flush()
    yield cluster.url
