"""PROTOCOL.md section 12 on the Redis store: every scenario of ``search_scenarios`` against
a real server on a real redis-server (real clock, short timings), and the search's keys."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import pytest
from redis_server import RedisServer
from redis_support import server_config
from search_scenarios import SCENARIOS
from support import Peer, connect, running_server

from aleatoria.config import Config

TIMINGS = {"interest_wait": 1.0, "search_timeout": 3.0, "search_tick": 0.05}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_scenario(
    scenario: Callable[[Callable[[str], AbstractAsyncContextManager[Peer]], Config], Awaitable[None]],
    redis_server: RedisServer,
) -> None:
    config = server_config(redis_server.url, **TIMINGS)
    async with running_server(config) as srv:

        def opened(user: str) -> AbstractAsyncContextManager[Peer]:
            return connect(srv, user)

        await scenario(opened, config)
