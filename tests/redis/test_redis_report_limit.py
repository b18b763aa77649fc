"""The reports-per-hour limit in Redis mode (PROTOCOL.md section 13,
``ALEATORIA_REPORTS_PER_HOUR``): the count is the user's, kept in Redis
(``aleatoria:reports-filed:<user>``, expiring an hour after the user's first report), so
neither a reconnect nor another instance starts it again; two connections or instances of
one user racing for its last report cannot both pass (one script checks and counts); and
while Redis is down reports go on, counted in memory from what this instance saw."""

from __future__ import annotations

from typing import Any

import trio
from health import wait_for_health
from redis_server import RedisServer
from redis_support import server_config
from support import Peer, connect, running_server

from aleatoria.store.redis import RedisStore, open_redis_store

KEY = "aleatoria:reports-filed:"
WINDOW_MS = 3600 * 1000


def report(user: str) -> dict[str, Any]:
    return {"type": "report_user", "payload": {"user": user, "reason": "spam"}}


async def refused(peer: Peer, user: str) -> None:
    """``peer`` reports ``user`` and is refused: limit_reached."""
    await peer.send(report(user))
    assert "limit_reached" == (await peer.expect("error", skip=True))["payload"]["code"]


async def test_report_count_is_per_user_across_connections_and_instances(redis_server: RedisServer) -> None:
    """3 reports on one instance; on another (a new connection, nothing carried over but
    Redis) a 4th is limit_reached and stores nothing. Redis holds the count, expiring within
    the hour; once the key is gone (the hour over) the user may report again."""
    config = server_config(redis_server.url, reports_per_hour=3)
    async with running_server(config) as one, running_server(config) as two:
        async with connect(one, "alice", skip=True) as alice:
            for troll in ("t1", "t2", "t3"):
                await alice.request(report(troll), "report_received", skip=True)
        async with connect(two, "alice", skip=True) as alice:
            await refused(alice, "t4")
            with redis_server.client() as r:
                key = KEY + "alice"
                assert b"3" == r.get(key)
                assert 0 < r.pttl(key) <= WINDOW_MS
                assert 3 == r.xlen("aleatoria:reports")
                r.delete(key)  # as its expiry an hour after the first report would
                await alice.request(report("t4"), "report_received", skip=True)
                assert (b"1", 4) == (r.get(key), r.xlen("aleatoria:reports"))


async def race(user: str, *stores: RedisStore) -> list[bool]:
    """Each of ``stores`` counts a report of ``user`` (limit 3) at once; their answers."""
    counted: list[bool] = [False] * len(stores)

    async def count(index: int, store: RedisStore) -> None:
        counted[index] = await store.safety.count_report(user, 3)

    async with trio.open_nursery() as nursery:
        for index, store in enumerate(stores):
            nursery.start_soon(count, index, store)
    return counted


async def test_racing_for_a_users_last_report_only_one_passes(redis_server: RedisServer) -> None:
    """The same user on two store instances sharing Redis (and twice on one: two connections
    in one scheduler pass share a pipeline), both counting its last allowed report at once:
    exactly one is counted, each time."""
    url = redis_server.url
    config = server_config(url, reports_per_hour=3)
    async with open_redis_store(config, url) as a, open_redis_store(config, url) as b:
        assert ("ok", "ok") == (a.health(), b.health())
        for n in range(30):
            user = f"u{n}"
            assert await a.safety.count_report(user, 3)
            assert await b.safety.count_report(user, 3)
            counted = await race(user, a, b if n % 2 else a)  # odd rounds: two instances
            assert 1 == sum(counted), counted
            assert [False, False] == await race(user, a, b)
            with redis_server.client() as r:
                assert b"3" == r.get(KEY + user)


async def test_redis_down_reports_go_on_and_the_count_falls_back_to_memory(redis_server: RedisServer) -> None:
    """alice files 2 reports, leaves; Redis is killed; she comes back: her 3rd report is
    received at once (stored in memory, no wait on Redis), and the count goes on in memory
    from the two Redis counted (this instance noted them): a 4th is limit_reached."""
    config = server_config(redis_server.url, reports_per_hour=3)
    async with (
        running_server(config) as srv,
        connect(srv, "watch", "Den", query="&v=2", skip=True) as watch,
    ):
        async with connect(srv, "alice", "Den", skip=True) as alice:
            for troll in ("t1", "t2"):
                await alice.request(report(troll), "report_received", skip=True)
        # Gone for good (not replaced): the next connection knows nothing of these.
        assert {"room": "Den", "user": "alice"} == (await watch.expect("member_left", skip=True))["payload"]
        redis_server.kill9()
        await wait_for_health(srv, "degraded")
        async with connect(srv, "alice", "Den", skip=True) as alice:
            with trio.fail_after(2):  # the call timeout is 2 s: a report that waited on Redis fails
                await alice.request(report("t3"), "report_received", skip=True)
            await refused(alice, "t4")
