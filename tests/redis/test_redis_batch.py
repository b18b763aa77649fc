"""The script calls of one scheduler pass go to Redis as one pipeline (``redis_batch``): one
worker-thread hop for many tasks, each getting its own result; and peer requests in one
batch leave each other's users alone, so none of them is answered by a crossed resend."""

from __future__ import annotations

import trio
from redis_server import RedisServer
from redis_support import server_config

from aleatoria.matchmaking import RequestOutcome
from aleatoria.store.redis import open_redis_store


async def test_one_pass_of_calls_is_one_batch(redis_server: RedisServer) -> None:
    url = redis_server.url
    async with open_redis_store(server_config(url), url) as store:
        users = [f"u{i}" for i in range(20)]
        for user in users:
            await store.connect(user, f"c-{user}")
        client = store.keeper.client
        before = (client.batches, client.calls)
        ended: dict[str, str | None] = {}

        async def pool(user: str) -> None:
            ended[user] = await store.set_available(user)

        async with trio.open_nursery() as nursery:
            for user in users:
                nursery.start_soon(pool, user)
        assert dict.fromkeys(users) == ended
        assert (1, 20) == (client.batches - before[0], client.calls - before[1])
        assert 20 == (await store.stats()).searching


async def test_requests_of_one_batch_do_not_cross(redis_server: RedisServer) -> None:
    url = redis_server.url
    async with open_redis_store(server_config(url), url) as store:
        for user in ("alice", "bob"):
            await store.connect(user, f"c-{user}")
            await store.set_available(user)
        outcomes: dict[str, RequestOutcome] = {}

        async def request(user: str) -> None:
            outcomes[user] = await store.request_peer(user, None)

        async with trio.open_nursery() as nursery:  # both in one pass: one batch
            nursery.start_soon(request, "alice")
            nursery.start_soon(request, "bob")
        # One of them picks the other; neither is told its match again (a resend).
        assert not any(outcome.resend for outcome in outcomes.values()), outcomes
        matched = {user: o.peer for user, o in outcomes.items() if o.peer is not None}
        assert len(matched) == 1 and set(matched.items()) <= {("alice", "bob"), ("bob", "alice")}
        assert store.match_peer("alice") == "bob" and store.match_peer("bob") == "alice"
