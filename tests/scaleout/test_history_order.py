"""A room's history holds its messages in their live order, across instances (PROTOCOL.md
section 15: a client pages forward with ``after`` from the last message it saw live).

Two members on two instances write to one room at once; a third member records the live
order. Every ``createTime`` must be later than the one delivered before it, and paging
forward from any message seen live must return exactly the messages delivered after it.
Before Redis stamped the time, each instance stamped its own and Redis ordered the live
stream by arrival: a red-team run found 12-19 inversions in 200 messages, and paging
forward skipped the messages that arrived after the cursor with an older time."""

from __future__ import annotations

import itertools

import trio
from scaleout_support import collect_chat, instances
from support import SocketPeer, connect

_PER_SENDER = 80


async def _send_all(client: SocketPeer) -> None:
    for n in range(_PER_SENDER):
        content = f"{client.user}:{n}"
        await client.send({"type": "chat_message", "room": "Den", "payload": {"content": content}})


async def test_paging_forward_from_any_live_message_misses_nothing(shared_redis: str) -> None:
    async with (
        instances(shared_redis, 2) as (one, two),
        connect(one, "ann", "Den", skip=True) as ann,
        connect(two, "ben", "Den", skip=True) as ben,
        connect(one, "reader", "Den", skip=True, query="&v=2") as reader,
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_all, ann)
            nursery.start_soon(_send_all, ben)
        live = await collect_chat(reader, 2 * _PER_SENDER)
        times = [m["createTime"] for m in live]
        backwards = [(a, b) for a, b in itertools.pairwise(times) if b <= a]
        assert [] == backwards
        ids = [m["messageId"] for m in live]
        for index, seen in enumerate(live):
            page = await reader.request(
                {
                    "type": "get_recent_messages",
                    "room": "Den",
                    "payload": {"after": seen["createTime"], "limit": 200},
                },
                "recent_messages",
                skip=True,
            )
            assert ids[index + 1 :] == [m["messageId"] for m in page["payload"]["messages"]], index
