"""An instance declared dead and reaped just after its heartbeat keeps its users
(PROTOCOL.md section 16: a stalled instance re-registers its users; only a newer connection
replaces a session). Found by the stalled-instance test in CI: a freeze that fell between the
heartbeat and the presence check made the thawed instance read its own users' presence as
removed (the reap had taken it) while it still counted itself alive, and it closed them as
replaced. The heartbeat now reads presence in the same atomic step.

One real server process, its Redis behind a proxy that holds back replies: the next beat runs
in Redis, and before the server hears of it the test reaps the instance exactly as another
instance's reaper does after a freeze."""

from __future__ import annotations

import redis
import trio
from delay_proxy import Delays, open_delay_proxy
from redis_server import RedisServer
from redis_support import serve_process, wait_until
from support import connect

from aleatoria.store.redis_client import Scripts
from aleatoria.store.redis_presence import INSTANCE_USERS_PREFIX, INSTANCES_KEY, PRESENCE_KEY
from aleatoria.store.redis_scripts import MATCHES_KEY, POOL_KEY

HOLD = 0.5  # seconds each reply to the server is held back (well within its call timeout)


async def test_an_instance_reaped_right_after_its_beat_keeps_its_users(redis_server: RedisServer) -> None:
    with redis_server.client() as r:
        await _reaped_after_beat(redis_server, r)


async def _reaped_after_beat(redis_server: RedisServer, r: redis.Redis) -> None:
    async with (
        open_delay_proxy(redis_server.port) as proxy,
        serve_process(proxy.url, "--heartbeat-interval", "0.3", "--presence-ttl", "5") as port,
        connect(port, "alice", skip=True) as alice,
    ):
        await alice.sync()
        registered = r.hget(PRESENCE_KEY, "alice")
        assert isinstance(registered, bytes)
        instance = registered.decode().partition("|")[0]
        score = r.zscore(INSTANCES_KEY, instance)

        proxy.set(commands=Delays(to_client=HOLD))
        await wait_until(lambda: r.zscore(INSTANCES_KEY, instance) != score)
        # The beat ran in Redis; its reply is on its way. Reaped now, as after a freeze.
        r.zadd(INSTANCES_KEY, {instance: 0})
        keys = [POOL_KEY, MATCHES_KEY, INSTANCES_KEY, PRESENCE_KEY]
        dead, gone, _ = Scripts().reap(keys, ["a-reaper", INSTANCE_USERS_PREFIX, 16], r)
        assert (dead, gone) == ([instance.encode()], [b"alice"])
        proxy.set()

        # The next beat finds the instance reaped: it re-registers alice's connection.
        await wait_until(lambda: r.hget(PRESENCE_KEY, "alice") == registered, timeout=15)
        with trio.fail_after(5):
            await alice.sync()  # still connected: not closed as replaced
