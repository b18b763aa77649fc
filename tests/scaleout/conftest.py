"""Fixtures of the scale-out tests: a real redis-server and a real Redis Cluster (3 masters,
started from the same binary), shared by several ``aleatoria serve`` instances."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "redis"))

from redis_support import RedisServer, find_redis_server
from scaleout_support import RedisCluster


@pytest.fixture(scope="session")
def redis_binary() -> str:
    binary = find_redis_server()
    if binary is None:
        message = "redis-server not found (run scripts/install-redis.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


@pytest.fixture
def redis_server(redis_binary: str, tmp_path: Path) -> Iterator[RedisServer]:
    """A running, empty redis-server (no persistence) for one test."""
    server = RedisServer(redis_binary, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


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
        server = RedisServer(redis_binary, tmp_path)
        server.start()
        try:
            yield server.url
        finally:
            server.stop()
        return
    cluster: RedisCluster = request.getfixturevalue("redis_cluster")
    cluster.flush()
    yield cluster.url
