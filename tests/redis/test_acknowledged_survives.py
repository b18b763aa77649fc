"""What the sender saw acknowledged survives a crash (PROTOCOL.md section 16): in Redis mode,
while Redis answers, a direct message is in Redis before its sender receives its own copy,
so ``kill -9`` of the server loses none of the messages whose senders got that copy."""

from __future__ import annotations

import orjson
import trio
import trio_websocket
from delay_proxy import Delays, open_delay_proxy
from redis_server import RedisServer
from redis_support import killable_server
from support import SocketPeer, connect

PAIRS = 4
ACKED_BEFORE_KILL = 400
WINDOW = 25  # messages a sender has sent whose own copy has not come back yet
# Redis is slow, not down: every command reaches it this late (well within the call
# timeout), so the server holds many messages it has not written yet at any moment.
SLOW = 0.2


class Storm:
    """Every user sends direct messages to its partner as fast as its window allows; each
    records the ones whose own copy came back (``incoming: false``)."""

    def __init__(self) -> None:
        self.acked: set[str] = set()
        self.sent = 0
        self.enough = trio.Event()
        self.go = trio.Event()
        self.windows: dict[str, trio.Semaphore] = {}
        self._senders: list[trio.CancelScope] = []

    def stop(self) -> None:
        """Stop sending (the readers go on until their connection is closed)."""
        for scope in self._senders:
            scope.cancel()

    async def send(self, client: SocketPeer, peer: str) -> None:
        window = self.windows[client.user] = trio.Semaphore(WINDOW)
        with trio.CancelScope() as scope:
            self._senders.append(scope)
            await self.go.wait()
            n = 0
            try:
                while True:
                    await window.acquire()
                    content = f"{client.user}:{n}"
                    await client.send(
                        {"type": "chat_message", "toUser": peer, "payload": {"content": content}}
                    )
                    self.sent += 1
                    n += 1
            except trio_websocket.ConnectionClosed:
                return

    async def read(self, client: SocketPeer) -> None:
        try:
            while True:
                message = await client.recv()
                if message["type"] != "chat_message" or message.get("fromUser") != client.user:
                    continue
                assert message["incoming"] is False
                self.acked.add(message["payload"]["content"])
                self.windows[client.user].release()
                if len(self.acked) >= ACKED_BEFORE_KILL:
                    self.enough.set()
        except trio_websocket.ConnectionClosed:
            return


async def test_acknowledged_direct_messages_survive_kill_9(redis_server: RedisServer) -> None:
    """A storm of direct messages between several pairs on a real ``aleatoria serve`` whose
    Redis (a real redis-server, behind a proxy that makes it slow) answers; the server is
    killed with SIGKILL mid-storm. Every message whose sender had received its own copy is
    in Redis' DM history."""
    pairs = [(f"a{i}", f"b{i}") for i in range(PAIRS)]
    storm = Storm()
    async with open_delay_proxy(redis_server.port) as proxy:
        proxy.set(commands=Delays(to_redis=SLOW))
        async with killable_server(proxy.url, "--frame-rate", "0") as (port, process):
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for a, b in pairs:
                        await nursery.start(_pair, port, a, b, storm)
                    storm.go.set()
                    await storm.enough.wait()
                    process.kill()
                    storm.stop()
    stored: set[str] = set()
    with redis_server.client() as r:
        for a, b in pairs:
            for raw in r.lrange(f"dm:{min(a, b)}:{max(a, b)}", 0, -1):
                stored.add(orjson.loads(raw)["payload"]["content"])
    lost = storm.acked - stored
    print(f"sent {storm.sent}, acknowledged {len(storm.acked)}, in Redis {len(stored)}")
    assert len(storm.acked) >= ACKED_BEFORE_KILL
    assert set() == lost, f"{len(lost)} acknowledged messages are not in Redis, e.g. {sorted(lost)[:5]}"


async def _pair(
    port: int, a: str, b: str, storm: Storm, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    async with (
        connect(port, a, skip=True) as first,
        connect(port, b, skip=True) as second,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(storm.read, first)
        nursery.start_soon(storm.read, second)
        nursery.start_soon(storm.send, first, b)
        nursery.start_soon(storm.send, second, a)
        task_status.started()
