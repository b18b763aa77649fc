"""Delivered once (PROTOCOL.md section 16): a room message reaches each member exactly once,
also while Redis answers slower than the bus's stall threshold and the local fallback kicks
in. A delaying TCP proxy sits between the server and a real redis-server.

One order for everyone, but for one thing: while the fallback delivers, a sender's own
copy waits until Redis has the message (what the sender saw acknowledged survives a crash,
``test_room_acknowledged_survives``), so a sender may see its message after messages the
others received after it. Any two members see the messages neither of them sent in the
same order."""

from __future__ import annotations

from collections import Counter
from contextlib import AsyncExitStack
from itertools import combinations

import trio
from delay_proxy import DelayProxy, Delays, open_delay_proxy
from health import wait_for_health
from redis_server import RedisServer
from redis_support import server_config
from support import SocketPeer, connect, running_server
from test_redis_metrics import scrape

from aleatoria.store.redis_bus import STALL_SECONDS

USERS = 4
PER_USER = 600
ROOM = "Den"
LATE = STALL_SECONDS + 0.35  # well past the stall threshold, well within the call timeout

# What is late in each phase (commands, pub/sub); a phase lasts while ``STEP`` more
# messages reach the first member, and the phases repeat until the traffic is over.
PHASES = [
    # Replies to commands late: the pub/sub copy of a publish is here before its reply.
    (Delays(to_client=LATE), Delays()),
    (Delays(), Delays()),
    # Commands reach Redis late: the publish runs after the stall fallback delivered it.
    (Delays(to_redis=LATE), Delays()),
    (Delays(), Delays()),
    # Everything late.
    (Delays(to_redis=LATE / 2, to_client=LATE / 2), Delays(to_client=LATE)),
    (Delays(), Delays()),
    # Only the pub/sub copies late (no stall: the publishes' replies are on time).
    (Delays(), Delays(to_client=LATE)),
    # Replies late, copies a little late.
    (Delays(to_client=LATE), Delays(to_client=LATE / 3)),
]
STEP = 300
PACE = 0.01  # seconds between two messages of one sender


class Member:
    """One client of the room and what it received, in order."""

    def __init__(self, client: SocketPeer) -> None:
        self.client = client
        self.seen: list[str] = []
        self._grew = trio.Event()

    async def read(self, total: int) -> None:
        while len(self.seen) < total:
            message = await self.client.expect("chat_message", skip=True)
            assert ROOM == message["room"]
            self.seen.append(message["payload"]["content"])
            self._grew.set()
            self._grew = trio.Event()

    async def wait_for(self, count: int) -> None:
        while len(self.seen) < count:
            await self._grew.wait()


async def test_room_messages_arrive_exactly_once_while_redis_is_late(redis_server: RedisServer) -> None:
    """Several members chat in one room while the proxy turns delays longer than the stall
    threshold on and off (replies late while the pub/sub copy is already here, publishes
    run late, copies late, all late). Every member receives every message exactly once; any
    two members receive the messages neither of them sent in the same order; the bus
    stalled (the fallback was used); and once traffic is over the bus tracks no message any
    more (its bookkeeping is empty)."""
    async with (
        open_delay_proxy(redis_server.port) as proxy,
        running_server(server_config(proxy.url, frame_rate=0)) as srv,
        AsyncExitStack() as stack,
    ):
        users = [f"u{i}" for i in range(USERS)]
        clients = [await stack.enter_async_context(connect(srv, user, ROOM, skip=True)) for user in users]
        members = [Member(client) for client in clients]
        total = USERS * PER_USER + 1
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for member in members:
                    nursery.start_soon(member.read, total)
                async with trio.open_nursery() as traffic:
                    for client in clients:
                        traffic.start_soon(_send, client, PER_USER)
                    traffic.start_soon(_switch_delays, proxy, members[0])
                    await members[0].wait_for(USERS * PER_USER)
                    traffic.cancel_scope.cancel()
                proxy.set()
                # A last message once the bus is back to normal: when its pub/sub copy has
                # arrived, so has every copy Redis published before it.
                await wait_for_health(srv, "ok", bus="ok")
                await clients[0].send(
                    {"type": "chat_message", "room": ROOM, "payload": {"content": "u0:last"}}
                )
        metrics = await scrape(srv.port)
    print(
        f"stalls {metrics['aleatoria_bus_stalls_total']:.0f}, pub/sub copies dropped "
        f"{metrics['aleatoria_bus_echoes_dropped_total']:.0f}"
    )
    expected = {f"{user}:{n}" for user in users for n in range(PER_USER)} | {"u0:last"}
    for member in members:
        duplicates = {text: count for text, count in Counter(member.seen).items() if count > 1}
        assert {} == duplicates, f"{member.client.user} received messages twice"
        assert expected == set(member.seen)
    for one, other in combinations(members, 2):
        pair = (one.client.user, other.client.user)
        order = _sent_by_others(one.seen, pair)
        assert order == _sent_by_others(other.seen, pair), f"{pair} saw another order"
    assert metrics["aleatoria_bus_stalls_total"] >= 1, "the delays never triggered the fallback"
    assert 0 == metrics["aleatoria_bus_echoes"]


def _sent_by_others(seen: list[str], users: tuple[str, ...]) -> list[str]:
    return [text for text in seen if text.partition(":")[0] not in users]


async def _send(client: SocketPeer, count: int) -> None:
    for n in range(count):
        await client.send(
            {"type": "chat_message", "room": ROOM, "payload": {"content": f"{client.user}:{n}"}}
        )
        await trio.sleep(PACE)  # pacing of the traffic generator, not synchronisation


async def _switch_delays(proxy: DelayProxy, observer: Member) -> None:
    while True:
        for commands, pubsub in PHASES:
            proxy.set(commands=commands, pubsub=pubsub)
            await observer.wait_for(len(observer.seen) + STEP)
