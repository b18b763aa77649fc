"""Fixtures of the Redis tests: a real redis-server per test, on a free port (see
``redis_server.py`` for where the binary comes from)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer
from redis_server import redis_binary as redis_binary
from redis_server import redis_server as redis_server


@pytest.fixture
def redis_down(redis_binary: str, tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server that is not running yet (call ``restart``); stopped at teardown."""
    server = RedisServer(redis_binary, tmp_path)
    try:
        yield server
    finally:
        server.stop()
