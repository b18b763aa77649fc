"""scripts/match_floor.py with ``--redis-url``: the same behaviour with its pool and matches
in a real redis-server, and nothing left there once its users have gone."""

from __future__ import annotations

import trio
from redis_server import RedisServer
from redis_support import wait_until
from test_floors import check_match_floor, start_floor


async def test_match_floor_in_redis_matches_relays_and_cleans_up(redis_server: RedisServer) -> None:
    async with trio.open_nursery() as nursery:
        await check_match_floor(await start_floor(nursery, "match_floor.py", "--redis-url", redis_server.url))
        with redis_server.client() as client:
            await wait_until(lambda: not client.keys("match_floor:*"))  # both left: out of pool and match
        nursery.cancel_scope.cancel()
