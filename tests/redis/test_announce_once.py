"""``Router.send_surely`` (the search queue's announcements to users on other instances,
PROTOCOL.md section 12) reaches the session it was meant for, once. Found by the search storm
on the Redis Cluster (issue 14): a new search of a user who had reconnected was answered by
an old match's ``assign_role``, sent again and again while Redis answered late (each stall
counted a publish already made as failed) or while the user was between two connections.

Two stores share one redis-server; A's router sends to Bob, registered on B (or nowhere)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from collections.abc import Set as AbstractSet
from contextlib import asynccontextmanager

import trio
from delay_proxy import Delays, open_delay_proxy
from redis_server import RedisServer
from redis_support import server_config

from aleatoria.hub import Hub
from aleatoria.router import Router, user_envelope
from aleatoria.store.redis import RedisStore, open_redis_store
from aleatoria.store.redis_bus import STALL_SECONDS

LATE = STALL_SECONDS + 0.35  # well past the stall threshold, well within the call timeout
FRAME = b'{"type":"ping","n":1}'
MARKER = b'{"type":"ping","n":2}'


class Received:
    """What B's bus hands over (B's events: its router in a server)."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.marker = trio.Event()

    def on_bus_messages(self, items: list[tuple[str | None, bytes]]) -> None:
        for room, data in items:
            if room is None:
                self.messages.append(data)
                if data == user_envelope("bob", "ping", MARKER):
                    self.marker.set()

    def peer_left(self, peer: str, leaver: str) -> None:
        pass

    def evict(self, instance: str, user: str, connection: str) -> None:
        pass

    def kick(self, user: str) -> bool:
        return False

    def safety_at_connect(self, user: str, blocked_by: AbstractSet[str], shadow: bool) -> None:
        pass

    def barred(self, user: str) -> None:
        return None

    def shadowed(self, user: str) -> bool:
        return False


@asynccontextmanager
async def _store(url: str) -> AsyncIterator[RedisStore]:
    config = server_config(url, presence_ttl=10.0, heartbeat_interval=1.0)
    async with open_redis_store(config, url) as store:
        with trio.fail_after(10):
            await store.redis_bus.wait_up()
        assert "ok" == store.health()
        yield store


async def test_a_user_offline_everywhere_is_not_waited_for(redis_server: RedisServer) -> None:
    """Bob has no presence (between two connections, or gone): his session is over, so the
    frame is not tried again until a later connection of his would get it."""
    async with _store(redis_server.url) as a, _store(redis_server.url) as b, trio.open_nursery() as nursery:
        router = Router(Hub(nursery), a)
        with trio.fail_after(1.0):  # the window is 5 s
            assert not await router.send_surely("bob", FRAME, "ping", window=5.0)
        await b.connect("bob", "c1")
        with trio.fail_after(5.0):
            assert await router.send_surely("bob", FRAME, "ping", window=5.0)
        nursery.cancel_scope.cancel()


async def test_a_late_reply_does_not_send_the_frame_again(redis_server: RedisServer) -> None:
    """A's replies from Redis come late (the bus stalls while the publish is in flight): the
    frame is published once and ``send_surely`` says so when the reply comes."""
    async with (
        open_delay_proxy(redis_server.port) as proxy,
        _store(proxy.url) as a,
        _store(redis_server.url) as b,
        trio.open_nursery() as nursery,
    ):
        received = Received()
        b.attach(received)
        await b.connect("bob", "c1")
        router = Router(Hub(nursery), a)
        proxy.set(commands=Delays(to_client=LATE))
        with trio.fail_after(5.0):
            assert await router.send_surely("bob", FRAME, "ping", window=5.0)
        proxy.set()
        assert a.redis_bus.stalls >= 1, "the late reply did not stall A's bus"
        # Everything A published before the marker reaches B before it (one channel).
        with trio.fail_after(5.0):
            assert await router.send_surely("bob", MARKER, "ping", window=5.0)
            await received.marker.wait()
        assert 1 == received.messages.count(user_envelope("bob", "ping", FRAME))
        nursery.cancel_scope.cancel()
