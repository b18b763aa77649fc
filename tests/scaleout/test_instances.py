"""Several instances sharing one Redis (or one Redis Cluster) behave as one server (PROTOCOL.md
section 9): rooms, DMs, signaling, matchmaking, list_rooms, history and replacement, with the
users spread over the instances. Every test runs on a single redis-server and on a Redis
Cluster of 3 masters."""

from __future__ import annotations

from typing import Any

import trio
from health import get_json
from scaleout_support import collect_chat, instances, redis_client, wait_until
from support import SocketPeer, close_of, connect

from aleatoria.store.redis_bus import room_channel
from aleatoria.store.redis_presence import PRESENCE_KEY


async def test_room_chat_is_seen_in_one_order_everywhere(shared_redis: str) -> None:
    """Six members on three instances all send at once: every member receives every message
    once, in the same order as everyone else, its own included."""
    per_user = 20
    users = [f"u{i}" for i in range(6)]
    async with instances(shared_redis, 3) as ports, trio.open_nursery() as nursery:
        clients: dict[str, SocketPeer] = {}
        received: dict[str, list[str]] = {}
        ready = trio.Event()

        async def member(i: int, user: str, *, task_status: trio.TaskStatus[None]) -> None:
            async with connect(ports[i % 3], user, "Den", skip=True) as client:
                clients[user] = client
                task_status.started()
                await ready.wait()
                async with trio.open_nursery() as inner:

                    async def send_all() -> None:
                        for n in range(per_user):
                            await client.send(
                                {"type": "chat_message", "room": "Den", "payload": {"content": f"{user}:{n}"}}
                            )

                    inner.start_soon(send_all)
                    got = await collect_chat(client, per_user * len(users))
                received[user] = [m["payload"]["content"] for m in got]

        for i, user in enumerate(users):
            await nursery.start(member, i, user)
        ready.set()
    first = received[users[0]]
    assert per_user * len(users) == len(set(first))
    for user in users:
        assert first == received[user], user
        mine = [c for c in first if c.startswith(user + ":")]
        assert [f"{user}:{n}" for n in range(per_user)] == mine  # each sender's order kept


async def test_direct_messages_and_history_across_instances(shared_redis: str) -> None:
    """A DM reaches the other instance (incoming true there, false for the sender); both sides
    read the conversation from either instance; a room message is in the history of another
    instance as soon as it was delivered there."""
    async with instances(shared_redis, 2) as (one, two):
        async with (
            connect(one, "alice", "Den", skip=True) as alice,
            connect(two, "bob", "Den", skip=True) as bob,
        ):
            await alice.send({"type": "chat_message", "toUser": "bob", "payload": {"content": "psst"}})
            copy = await alice.expect("chat_message", skip=True)
            delivered = await bob.expect("chat_message", skip=True)
            assert (False, True) == (copy["incoming"], delivered["incoming"])
            assert {**copy, "incoming": True} == delivered
            history = await bob.request(
                {"type": "get_direct_messages", "payload": {"withUser": "alice"}},
                "direct_messages",
                skip=True,
            )
            assert ["psst"] == [m["payload"]["content"] for m in history["payload"]["messages"]]

            for n in range(5):
                await alice.send({"type": "chat_message", "room": "Den", "payload": {"content": str(n)}})
            got = await collect_chat(bob, 5)
            recent = await bob.request(
                {"type": "get_recent_messages", "room": "Den"}, "recent_messages", skip=True
            )
            assert [m["messageId"] for m in reversed(got)] == [
                m["messageId"] for m in recent["payload"]["messages"]
            ]

            # A DM to someone offline everywhere is kept for later.
            await bob.send({"type": "chat_message", "toUser": "carol", "payload": {"content": "later"}})
            await bob.expect("chat_message", skip=True)
        async with connect(one, "carol", skip=True) as carol:
            # History is written behind: instance one reads it from Redis once instance two's
            # writer has flushed it (milliseconds; there is no signal to wait on across
            # processes, so poll the observable, bounded).
            with trio.fail_after(5):
                while True:
                    later = await carol.request(
                        {"type": "get_direct_messages", "payload": {"withUser": "bob"}},
                        "direct_messages",
                        skip=True,
                    )
                    if later["payload"]["messages"]:
                        break
                    await trio.sleep(0.02)
            assert ["later"] == [m["payload"]["content"] for m in later["payload"]["messages"]]


async def test_signaling_relay_across_instances(shared_redis: str) -> None:
    """offer, answer, candidate and hangup reach the other instance with the payload unchanged
    and fromUser set; a target offline everywhere gets the sender ``peer_unavailable``."""
    payloads = {
        "webrtc_offer": {"sdp": "v=0\r\no=- 1 2 IN IP4 127.0.0.1", "type": "offer", "n": [1, 2.5, None]},
        "webrtc_answer": {"sdp": "answer", "nested": {"a": {"b": [True, False]}}},
        "webrtc_candidate": {"candidate": "candidate:1 1 udp 2122260223 10.0.0.1 54321 typ host"},
        "hangup": {"reason": "bye"},
    }
    async with (
        instances(shared_redis, 2) as (one, two),
        connect(one, "alice", skip=True) as alice,
        connect(two, "bob", skip=True) as bob,
    ):
        for kind, payload in payloads.items():
            await alice.send({"type": kind, "toUser": "bob", "payload": payload})
            got = await bob.expect(kind)
            assert (payload, "alice", "bob") == (got["payload"], got["fromUser"], got["toUser"])
            await bob.send({"type": kind, "toUser": "alice", "payload": payload})
            back = await alice.expect(kind)
            assert (payload, "bob") == (back["payload"], back["fromUser"])
        await alice.send({"type": "webrtc_offer", "toUser": "nobody", "payload": {}})
        error = await alice.expect("error")
        assert "peer_unavailable" == error["payload"]["code"]


async def test_matchmaking_across_instances(shared_redis: str) -> None:
    """A requester on one instance is matched with a pooled user on another: both get their
    roles; "next" ends the match and tells the peer; a disconnect tells the peer too; users
    in a match are not picked."""
    async with instances(shared_redis, 3) as (one, two, three):
        async with (
            connect(one, "alice", skip=True) as alice,
            connect(two, "bob", skip=True) as bob,
            connect(three, "carol", skip=True) as carol,
        ):
            await bob.send({"type": "user_available_webrtc"})
            await bob.sync()
            mine = await alice.request({"type": "request_random_peer"}, "assign_role", skip=True)
            assert ("impolite", "bob") == role_and_peer(mine)
            theirs = await bob.expect("assign_role", skip=True)
            assert ("polite", "alice") == role_and_peer(theirs)
            assert mine["payload"]["matchId"] == theirs["payload"]["matchId"], "one match, one id"
            # Nobody else is pooled; bob is in a match: carol gets nobody.
            await carol.request({"type": "request_random_peer"}, "no_peer_available", skip=True)
            await carol.send({"type": "user_available_webrtc"})
            await carol.sync()
            # "next": alice leaves bob for carol; bob hears it from alice.
            nxt = await alice.request(
                {"type": "request_random_peer", "payload": {"currentPeerId": "bob"}}, "assign_role", skip=True
            )
            assert ("impolite", "carol") == role_and_peer(nxt)
            left = await bob.expect("hangup", skip=True)
            assert ("alice", {"reason": "peer_left"}) == (left["fromUser"], left["payload"])
            assert ("polite", "alice") == role_and_peer(await carol.expect("assign_role", skip=True))
        # alice, bob, carol disconnect: the pool and matches are empty.
        with redis_client(shared_redis) as r:
            await wait_until(lambda: 0 == r.scard("available:webrtc") == r.hlen(PRESENCE_KEY))
            assert {} == r.hgetall("webrtc:matches:{available:webrtc}")


async def test_get_rooms_and_leaving_span_instances(shared_redis: str) -> None:
    """``list_rooms`` lists the rooms of every instance (``get_rooms`` the requester's own,
    as the original server did); a room is forgotten when its last member anywhere leaves."""
    async with (
        instances(shared_redis, 2) as (one, two),
        connect(one, "alice", "Den", skip=True) as alice,
        connect(two, "bob", "Attic", skip=True) as bob,
    ):
        rooms = await alice.request({"type": "get_rooms"}, "rooms_list", skip=True)
        assert ["Den"] == rooms["payload"]["rooms"]
        directory = await alice.request({"type": "list_rooms"}, "rooms_directory", skip=True)
        expected = [{"room": "Attic", "members": 1}, {"room": "Den", "members": 1}]
        assert expected == directory["payload"]["rooms"]
        await bob.request({"type": "leave_room", "room": "Attic"}, "room_left", skip=True)
        directory = await alice.request({"type": "list_rooms"}, "rooms_directory", skip=True)
        assert [{"room": "Den", "members": 1}] == directory["payload"]["rooms"]


async def test_replacing_a_connection_on_another_instance(shared_redis: str) -> None:
    """alice connects to instance 2 while connected to instance 1: the first connection is
    closed with 4001; her rooms, pool place and match carry over; nothing is lost in Redis."""
    async with (
        instances(shared_redis, 2) as (one, two),
        connect(one, "bob", "Den", skip=True) as bob,
        connect(one, "carol", skip=True) as carol,
    ):
        async with connect(one, "alice", "Den", skip=True) as alice:
            await alice.send({"type": "user_available_webrtc"})
            await alice.sync()
            async with connect(two, "alice", "Attic", skip=True) as again:
                closed = await _closed(alice)
                assert (4001, "replaced") == closed
                # Still in Den (carried over), and in Attic (its own URL room).
                await bob.send(
                    {"type": "chat_message", "room": "Den", "payload": {"content": "still there?"}}
                )
                assert "still there?" == (await again.expect("chat_message", skip=True))["payload"]["content"]
                rooms = await again.request({"type": "get_rooms"}, "rooms_list", skip=True)
                assert ["Attic", "Den"] == rooms["payload"]["rooms"]
                # Still pooled: carol is matched with the new connection.
                match = await carol.request({"type": "request_random_peer"}, "assign_role", skip=True)
                assert "alice" == match["payload"]["peerId"]
                assert "carol" == (await again.expect("assign_role", skip=True))["payload"]["peerId"]
                health = await get_json(one, "/health")
                assert 2 == health["connections"]  # bob and carol: alice is gone from 1
            # The new connection left: carol hears it.
            assert "alice" == (await carol.expect("hangup", skip=True))["fromUser"]
        with redis_client(shared_redis) as r:
            await wait_until(lambda: not r.hexists(PRESENCE_KEY, "alice"))
            assert {b"bob"} == r.smembers("room:members:Den")


async def test_a_room_message_crosses_redis_once_per_instance(shared_redis: str) -> None:
    """Each instance subscribes to a room's channel once, however many members it has there,
    and unsubscribes when its last member leaves."""
    channel = room_channel("Den")

    def subscribers(r: Any) -> int:
        if "+cluster" in shared_redis:
            node = r.get_node_from_key(channel)
            [(_, count)] = r.execute_command("PUBSUB SHARDNUMSUB", channel, target_nodes=node)
            return int(count)
        return int(r.pubsub_numsub(channel)[0][1])

    async with instances(shared_redis, 2) as (one, two):
        with redis_client(shared_redis) as r:
            async with (
                connect(one, "a1", "Den", skip=True),
                connect(one, "a2", "Den", skip=True),
                connect(one, "a3", "Den", skip=True),
            ):
                assert 1 == subscribers(r)
                async with connect(two, "b1", "Den", skip=True) as b1:
                    assert 2 == subscribers(r)
                    await b1.request({"type": "leave_room", "room": "Den"}, "room_left", skip=True)
                    await wait_until(lambda: 1 == subscribers(r))
            await wait_until(lambda: 0 == subscribers(r))


async def _closed(client: SocketPeer) -> tuple[int, str]:
    import trio_websocket

    try:
        while True:
            await client.recv()
    except trio_websocket.ConnectionClosed as exc:
        return close_of(exc)


def role_and_peer(message: dict[str, Any]) -> tuple[str, str]:
    """``assign_role``'s original fields (section 12 adds matchId and commonInterests)."""
    return message["payload"]["role"], message["payload"]["peerId"]
