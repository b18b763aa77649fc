"""The subscriber thread's drain reads published messages off the connection itself (not
through redis-py's ``get_message``): every message and every subscription confirmation
still comes out once, in Redis' order, byte-exact, across drains cut by the batch limit;
and redis-py's PubSub keeps its own bookkeeping of what is subscribed (an unsubscribed
channel is forgotten, as ``get_message`` would have done)."""

from __future__ import annotations

import select
import time

import pytest
import redis
from redis_server import RedisServer

from aleatoria.store.redis_subscriber import Message, _Subscription

WAIT = 5.0


def _read(subscription: _Subscription, count: int, limit: int = 512) -> list[Message]:
    """Drain until ``count`` items came (waiting on the socket, bounded)."""
    out: list[Message] = []
    deadline = time.monotonic() + WAIT
    while len(out) < count:
        got = subscription.drain(limit)
        assert len(got) <= limit
        out += got
        if not got:  # as the thread does: wait on the socket only once nothing is buffered
            left = deadline - time.monotonic()
            assert left > 0, f"only {len(out)} of {count} items came"
            select.select(subscription.sockets(), [], [], left)
    assert [] == subscription.drain(limit)
    return out


@pytest.mark.parametrize("protocol", [2, 3])
def test_messages_and_confirmations_come_once_in_order(redis_server: RedisServer, protocol: int) -> None:
    """With RESP2 (the store's: read directly) and RESP3 (through redis-py): confirmations,
    messages on two channels, an unsubscribe, then more messages (one to the channel left:
    not received), and 1,200 messages drained 512 at a time."""
    awkward = b"\r\n*3\r\n$7\r\nmessage\r\n" + bytes(range(256)) * 400
    with redis.Redis.from_url(redis_server.url, protocol=protocol, socket_timeout=WAIT) as r:
        subscription = _Subscription(r, cluster=False)
        try:
            subscription.subscribe(["a", "b"])
            assert [("subscribe", b"a", 1), ("subscribe", b"b", 2)] == _read(subscription, 2)
            r.publish("a", b"m1")
            r.publish("b", awkward)
            r.publish("a", b"m3")
            expected = [("message", b"a", b"m1"), ("message", b"b", awkward), ("message", b"a", b"m3")]
            assert expected == _read(subscription, 3)
            subscription.unsubscribe("a")
            assert [("unsubscribe", b"a", 1)] == _read(subscription, 1)
            pubsub = subscription._pubsub
            assert set() == pubsub.pending_unsubscribe_channels
            assert [b"b"] == list(pubsub.channels)
            r.publish("a", b"gone")
            pipe = r.pipeline(transaction=False)
            for n in range(1200):
                pipe.publish("b", str(n))
            pipe.execute()
            many = _read(subscription, 1200, limit=512)
            assert [("message", b"b", str(n).encode()) for n in range(1200)] == many
        finally:
            subscription.close()
