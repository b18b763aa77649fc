"""The new-DM limit in Redis mode (PROTOCOL.md section 16): the count of new partners an
hour is the user's, kept in Redis (``aleatoria:dm-partners:<user>``), so neither a
reconnect nor another instance starts it again; two instances racing for a user's last
partner cannot both pass (one script checks and adds); and while Redis is down DMs go on and
the count goes on in memory, from what this instance saw."""

from __future__ import annotations

import time
from typing import Any

import trio
from health import wait_for_health
from redis_server import RedisServer
from redis_support import server_config
from support import Peer, connect, running_server

from aleatoria.store.redis import RedisStore, open_redis_store

KEY = "aleatoria:dm-partners:"
WINDOW_MS = 3600 * 1000


def dm(to: str, content: str = "hi") -> dict[str, Any]:
    return {"type": "chat_message", "toUser": to, "payload": {"content": content}}


async def error_code(peer: Peer, message: dict[str, Any]) -> str:
    await peer.send(message)
    code: str = (await peer.expect("error", skip=True))["payload"]["code"]
    return code


async def sent(peer: Peer, to: str, content: str = "hi") -> None:
    """``peer`` DMs ``to`` and gets its own copy back (stored: PROTOCOL.md section 16)."""
    got = await peer.request(dm(to, content), "chat_message", skip=True)
    assert (to, content) == (got["toUser"], got["payload"]["content"])


async def test_new_dm_count_is_per_user_across_connections_and_instances(redis_server: RedisServer) -> None:
    """3 partners on one instance; on another (a new connection, nothing carried over but
    Redis) a 4th is limit_reached and a partner of this hour is fine. The set in Redis holds
    the three, expiring within the hour; once a partner's hour has passed (its score an hour
    old) a new partner takes its place."""
    config = server_config(redis_server.url, new_dm_per_hour=3)
    async with running_server(config) as one, running_server(config) as two:
        async with connect(one, "alice", skip=True) as alice:
            for to in ("p1", "p2", "p3"):
                await sent(alice, to)
        async with connect(two, "alice", skip=True) as alice:
            assert "limit_reached" == await error_code(alice, dm("p4"))
            await sent(alice, "p1", "again")
            with redis_server.client() as r:
                key = KEY + "alice"
                assert {b"p1", b"p2", b"p3"} == set(r.zrange(key, 0, -1))
                assert 0 < r.pttl(key) <= WINDOW_MS
                # p1's hour passes (as the clock would move it: its first time an hour back).
                r.zadd(key, {"p1": int(time.time() * 1000) - WINDOW_MS - 1}, xx=True)
                await sent(alice, "p4")
                assert "limit_reached" == await error_code(alice, dm("p5"))
                assert {b"p2", b"p3", b"p4"} == set(r.zrange(key, 0, -1))


async def race(user: str, *tries: tuple[RedisStore, str]) -> list[float | None]:
    """Each (store, partner) of ``tries`` adds ``partner`` for ``user`` at once; their answers."""
    ages: list[float | None] = [None] * len(tries)

    async def add(index: int, store: RedisStore, partner: str) -> None:
        ages[index] = await store.safety.new_dm_partner(user, partner, 3)

    async with trio.open_nursery() as nursery:
        for index, (store, partner) in enumerate(tries):
            nursery.start_soon(add, index, store, partner)
    return ages


async def test_racing_for_a_users_last_partner_only_one_passes(redis_server: RedisServer) -> None:
    """The same user on two store instances sharing Redis (and twice on one: two connections
    in one scheduler pass share a pipeline), both adding its last allowed partner at once:
    exactly one is counted, each time."""
    url = redis_server.url
    config = server_config(url, new_dm_per_hour=3)
    async with open_redis_store(config, url) as a, open_redis_store(config, url) as b:
        assert ("ok", "ok") == (a.health(), b.health())
        for n in range(30):
            user = f"u{n}"
            assert 0.0 == await a.safety.new_dm_partner(user, "p1", 3)
            assert 0.0 == await b.safety.new_dm_partner(user, "p2", 3)
            ages = await race(user, (a, "x"), (b if n % 2 else a, "y"))  # odd rounds: two instances
            assert 1 == sum(age is not None for age in ages), ages
            with redis_server.client() as r:
                assert 3 == r.zcard(KEY + user)


async def test_redis_down_dms_go_on_and_the_count_falls_back_to_memory(redis_server: RedisServer) -> None:
    """alice writes to 2 partners, leaves; Redis is killed; she comes back: her DM to bob is
    delivered at once (no wait on Redis), and the count goes on in memory from the two Redis
    counted (this instance noted them): a 4th partner is limit_reached, p1 still fine."""
    config = server_config(redis_server.url, new_dm_per_hour=3)
    async with (
        running_server(config) as srv,
        connect(srv, "bob", "Den", skip=True) as bob,
        connect(srv, "watch", "Den", query="&v=2", skip=True) as watch,
    ):
        async with connect(srv, "alice", "Den", skip=True) as alice:
            for to in ("p1", "p2"):
                await sent(alice, to)
        # Gone for good (not replaced): the next connection knows nothing of these.
        assert {"room": "Den", "user": "alice"} == (await watch.expect("member_left", skip=True))["payload"]
        redis_server.kill9()
        await wait_for_health(srv, "degraded")
        async with connect(srv, "alice", "Den", skip=True) as alice:
            with trio.fail_after(2):  # the call timeout is 2 s: a DM that waited on Redis fails
                await alice.send(dm("bob", "still here"))
                got = await bob.expect("chat_message", skip=True)
            assert ("alice", "still here") == (got["fromUser"], got["payload"]["content"])
            assert "limit_reached" == await error_code(alice, dm("p4"))
            await sent(alice, "p1", "again")
