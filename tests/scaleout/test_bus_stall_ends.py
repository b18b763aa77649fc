"""A bus stall always ends (PROTOCOL.md section 9: frames for users on other instances keep
flowing). Found by the 3-instance search storm on the Redis Cluster (issue 14): tens of
searchers heard ``searching`` and then nothing, because one instance's bus had declared a
stall that never ended. Its watchdog had counted a publish that merely waited for the
writer task (the event loop busy for longer than ``STALL_SECONDS``, nothing sent to Redis
yet) as Redis stalling: it failed the publish, and since nobody publishes on a stalled bus
no pipeline ever returned to end the stall. Every match and timeout that instance then had
to announce to a user on another instance was retried for ``ALEATORIA_ANNOUNCE_RETRY`` and
given up (``event=delivery_given_up``).

Two stores share one Redis (single and Cluster); Bob is registered on B. A's event loop is
held up right after a frame for Bob is queued, before A's writer could send it (the fault
the storm's load produced). A frame for Bob must then still be handed over within
``Router.send_surely``'s window, every time."""

from __future__ import annotations

import time

import trio
from scaleout_support import instance_config

from aleatoria.hub import Hub
from aleatoria.router import Router, user_envelope
from aleatoria.store.redis import RedisStore, open_redis_store
from aleatoria.store.redis_bus import STALL_SECONDS

ROUNDS = 4
# Longer than the stall threshold, far shorter than the presence TTL and the call timeout.
HELD_UP = STALL_SECONDS + 0.15


async def _ready(store: RedisStore) -> None:
    with trio.fail_after(10):
        await store.redis_bus.wait_up()
    assert "ok" == store.health()


async def test_a_stall_declared_while_the_writer_waited_for_the_loop_ends(shared_redis: str) -> None:
    config = instance_config(shared_redis, presence_ttl=10.0, heartbeat_interval=1.0)
    url = config.effective_redis_url
    assert url is not None
    async with (
        open_redis_store(config, url) as a,
        open_redis_store(config, url) as b,
        trio.open_nursery() as nursery,
    ):
        await _ready(a)
        await _ready(b)
        await b.connect("bob", "c1")
        router = Router(Hub(nursery), a)
        frame = b'{"type":"ping"}'
        assert await router.send_surely("bob", frame, "ping", window=3.0)
        for _ in range(ROUNDS):
            a.redis_bus.route("bob", user_envelope("bob", "ping", frame))
            # The fault: A's event loop is busy (here: blocked) with the publish queued and
            # A's writer not yet run.
            time.sleep(HELD_UP)  # noqa: ASYNC251 -- the injected fault, not a wait
            assert await router.send_surely("bob", frame, "ping", window=3.0), (
                f"a frame for a user on another instance was given up (stalls: {a.redis_bus.stalls}, "
                f"stalled: {a.redis_bus.stalled})"
            )
        nursery.cancel_scope.cancel()
