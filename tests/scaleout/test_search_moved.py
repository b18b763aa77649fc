"""A searcher who moves to another instance and then leaves (PROTOCOL.md sections 5 and 12): U
searches (``wait: true``) on one ``aleatoria serve`` process, connects again on a second one
(its first connection is replaced), then closes. Its search ends with it: the queue no longer
holds it and ``get_stats`` counts nobody searching. The second instance took the user's pool
place and match over but not its queue place, so on the disconnect nobody left the queue: U
stayed there, counted as searching, until ``ALEATORIA_SEARCH_TIMEOUT`` (120 s by default)."""

from __future__ import annotations

import contextlib

import trio
import trio_websocket
from redis_server import RedisServer
from scaleout_support import redis_client, serve_process, wait_until
from support import connect

from aleatoria.store.redis_scripts import QUEUE_KEY


async def test_a_moved_searcher_leaves_the_queue_when_it_disconnects(redis_server: RedisServer) -> None:
    """Searching on one instance, reconnected on the other, gone: out of the queue at once."""
    url = redis_server.url
    async with serve_process("--redis-url", url) as one, serve_process("--redis-url", url) as two:
        with trio.fail_after(10):
            async with connect(one.port, "u", skip=True) as first:
                await first.send({"type": "request_random_peer", "payload": {"wait": True}})
                await first.expect("searching", skip=True)
                async with connect(two.port, "u", skip=True) as second:
                    with contextlib.suppress(trio_websocket.ConnectionClosed):
                        while True:  # until the first connection is closed as replaced
                            await first.recv()
                    assert first.ws.closed is not None
                    assert 4001 == first.ws.closed.code
                    await second.sync()
            with redis_client(url) as r:
                try:
                    await wait_until(lambda: r.zscore(QUEUE_KEY, "u") is None, timeout=5)
                except trio.TooSlowError:
                    raise AssertionError("u is still queued after leaving") from None
            async with connect(two.port, "v", skip=True) as probe:
                stats = await probe.request({"type": "get_stats"}, "stats", skip=True)
                assert 0 == stats["payload"]["searching"]
