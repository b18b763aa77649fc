"""What the sender saw acknowledged survives a crash, for room messages (PROTOCOL.md section
16): in Redis mode, while Redis answers, a room message is in Redis before its sender
receives its own copy -- also while Redis is later than the bus's stall threshold and the
local fallback delivers to the other members at once -- so ``kill -9`` of the server loses
none of the messages whose senders got that copy; and no member gets a message twice."""

from __future__ import annotations

from collections import Counter

import orjson
import trio
import trio_websocket
from delay_proxy import DelayProxy, Delays, open_delay_proxy
from redis_server import RedisServer
from redis_support import killable_server
from support import SocketPeer, connect
from test_redis_metrics import scrape

from aleatoria.store.redis_bus import STALL_SECONDS

USERS = 4
ROOM = "Den"
LATE = STALL_SECONDS + 0.35  # well past the stall threshold, well within the call timeout
WINDOW = 20  # messages a sender has sent whose own copy has not come back yet
PACE = 0.01  # seconds between two messages of one sender
STEP = 150  # a phase lasts while this many more messages reach the observer
# What is late in each phase (commands, pub/sub). The server is killed at the end of the
# last one: Redis' replies are late, so the writer waits for its pipeline in flight while
# the next messages queue up behind it and the fallback delivers them to the members.
PHASES = [
    (Delays(), Delays()),
    # Commands reach Redis late: the publish runs after the fallback delivered it.
    (Delays(to_redis=LATE), Delays()),
    (Delays(), Delays()),
    # Everything late.
    (Delays(to_redis=LATE / 2, to_client=LATE / 2), Delays(to_client=LATE)),
    (Delays(), Delays()),
    # Replies late.
    (Delays(to_client=LATE), Delays()),
]


class Member:
    """One client of the room: sends paced messages (at most ``WINDOW`` unacknowledged),
    keeps what it received in order and which of its own messages came back."""

    def __init__(self, client: SocketPeer) -> None:
        self.client = client
        self.seen: list[str] = []
        self.acked: set[str] = set()
        self.window = trio.Semaphore(WINDOW)
        self._grew = trio.Event()

    async def read(self) -> None:
        try:
            while True:
                message = await self.client.recv()
                if message["type"] != "chat_message":
                    continue
                content = message["payload"]["content"]
                self.seen.append(content)
                if message["fromUser"] == self.client.user:
                    self.acked.add(content)
                    self.window.release()
                self._grew.set()
                self._grew = trio.Event()
        except trio_websocket.ConnectionClosed:
            return

    async def send(self) -> None:
        n = 0
        try:
            while True:
                await self.window.acquire()
                content = f"{self.client.user}:{n}"
                await self.client.send(
                    {"type": "chat_message", "room": ROOM, "payload": {"content": content}}
                )
                n += 1
                await trio.sleep(PACE)  # pacing of the traffic generator, not synchronisation
        except trio_websocket.ConnectionClosed:
            return

    async def wait_for(self, count: int) -> None:
        while len(self.seen) < count:
            await self._grew.wait()


async def test_acknowledged_room_messages_survive_kill_9_while_redis_is_late(
    redis_server: RedisServer,
) -> None:
    """Several members of one room chat on a real ``aleatoria serve`` whose Redis (a real
    redis-server behind a delaying proxy) turns later than the stall threshold and back;
    the server is killed with SIGKILL while Redis' replies are late. Every room message
    whose sender had received its own copy is in Redis' room history; no member received
    any message twice; and the fallback was used (the bus stalled)."""
    async with (
        open_delay_proxy(redis_server.port) as proxy,
        killable_server(proxy.url, "--frame-rate", "0") as (port, process),
    ):
        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                members = [await nursery.start(_member, port, f"u{i}") for i in range(USERS)]
                stalls = await _run_phases(proxy, port, members[0])
                process.kill()
    with redis_server.client() as r:
        stored = {orjson.loads(raw)["payload"]["content"] for raw in r.zrange(f"room:messages:{ROOM}", 0, -1)}
    acked = set().union(*(member.acked for member in members))
    lost = acked - stored
    print(f"stalls {stalls:.0f}, acknowledged {len(acked)}, in Redis {len(stored)}")
    assert stalls >= 1, "the delays never triggered the fallback"
    assert set() == lost, f"{len(lost)} acknowledged messages are not in Redis, e.g. {sorted(lost)[:5]}"
    for member in members:
        duplicates = {text: count for text, count in Counter(member.seen).items() if count > 1}
        assert {} == duplicates, f"{member.client.user} received messages twice"


async def _member(
    port: int, user: str, *, task_status: trio.TaskStatus[Member] = trio.TASK_STATUS_IGNORED
) -> None:
    async with connect(port, user, ROOM, skip=True) as client, trio.open_nursery() as nursery:
        member = Member(client)
        nursery.start_soon(member.send)
        task_status.started(member)
        await member.read()  # until the connection is gone
        nursery.cancel_scope.cancel()  # the sender may be waiting for acknowledgements


async def _run_phases(proxy: DelayProxy, port: int, observer: Member) -> float:
    """Go through ``PHASES``; returns the bus's stalls so far (read before the kill)."""
    for commands, pubsub in PHASES:
        proxy.set(commands=commands, pubsub=pubsub)
        await observer.wait_for(len(observer.seen) + STEP)
    return (await scrape(port))["aleatoria_bus_stalls_total"]
