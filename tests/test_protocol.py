"""Every row of PROTOCOL.md section 4, with the exact reply shapes: the in-memory tier (the
real store, hub, router and sessions with a recording socket, on trio's mock clock; see
tests/inmemory.py). What only real sockets show is in test_websocket_edge.py, test_http.py
and test_hostile.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from inmemory import FakePeer as Peer
from inmemory import InMemoryServer as RunningServer
from inmemory import connect, inmemory_server
from trio.testing import MockClock


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    async with inmemory_server() as running:
        yield running


def system_reply(kind: str, to: str, payload: Any, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "fromUser": "system", "toUser": to, **extra, "payload": payload}


def error(to: str, code: str, text: str) -> dict[str, Any]:
    return system_reply("error", to, {"error": text, "code": code})


async def test_connect_joins_the_url_room(server: RunningServer, autojump_clock: MockClock) -> None:
    """The room in the URL (default Lobby) is joined and confirmed with room_joined."""
    async with connect(server, "alice", joined=False) as alice:
        assert (
            system_reply("room_joined", "alice", {"room": "Lobby", "action": "joined"}, room="Lobby")
            == await alice.recv()
        )
    async with connect(server, "bob", "Games", joined=False) as bob:
        assert "Games" == (await bob.expect("room_joined"))["room"]


async def test_room_chat_shape(server: RunningServer, autojump_clock: MockClock) -> None:
    """Room chat: fromUser overwritten, server createTime, messageId kept or assigned."""
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        await alice.send(
            {
                "type": "chat_message",
                "room": "Lobby",
                "fromUser": "mallory",
                "createTime": "1999-01-01T00:00:00Z",
                "messageId": "m-1",
                "payload": {"content": "hello", "extra": [1, 2]},
            }
        )
        got = await bob.expect("chat_message")
        assert "alice" == got["fromUser"]
        assert "m-1" == got["messageId"]
        assert got["createTime"].startswith("20") and not got["createTime"].startswith("1999")
        assert {"content": "hello", "extra": [1, 2]} == got["payload"]
        assert got == await alice.expect("chat_message")
        await alice.send({"type": "chat_message", "room": "Lobby", "payload": {"content": "x"}})
        assert (await bob.expect("chat_message"))["messageId"]


async def test_room_chat_requires_membership(server: RunningServer, autojump_clock: MockClock) -> None:
    """Chat to a room one has not joined is refused with not_in_room."""
    async with connect(server, "alice") as alice:
        await alice.send({"type": "chat_message", "room": "Other", "payload": {"content": "x"}})
        assert (
            error("alice", "not_in_room", "You are not in that room. Join the room first.")
            == await alice.recv()
        )


async def test_chat_needs_exactly_one_target(server: RunningServer, autojump_clock: MockClock) -> None:
    """Neither or both of room and toUser: invalid_target."""
    async with connect(server, "alice") as alice:
        for target in ({}, {"room": "Lobby", "toUser": "bob"}):
            await alice.send({"type": "chat_message", "payload": {"content": "x"}, **target})
            assert "invalid_target" == (await alice.expect("error"))["payload"]["code"]


async def test_direct_message_both_copies_and_offline_persistence(
    server: RunningServer, autojump_clock: MockClock
) -> None:
    """DM: recipient gets incoming:true, sender a copy with incoming:false; an offline
    recipient reads it later with get_direct_messages."""
    async with connect(server, "alice") as alice:
        async with connect(server, "bob") as bob:
            await alice.send({"type": "chat_message", "toUser": "bob", "payload": {"content": "hey"}})
            incoming = await bob.expect("chat_message")
            copy = await alice.expect("chat_message")
            assert (True, False) == (incoming["incoming"], copy["incoming"])
            assert ("alice", "bob") == (incoming["fromUser"], incoming["toUser"])
            assert incoming["messageId"] == copy["messageId"]
        await alice.send({"type": "chat_message", "toUser": "carol", "payload": {"content": "later"}})
        assert False is (await alice.expect("chat_message"))["incoming"]
    async with connect(server, "carol") as carol:
        reply = await carol.request(
            {"type": "get_direct_messages", "payload": {"withUser": "alice"}}, "direct_messages"
        )
        assert "alice" == reply["payload"]["withUser"]
        assert ["later"] == [m["payload"]["content"] for m in reply["payload"]["messages"]]


async def test_join_and_leave_are_idempotent(server: RunningServer, autojump_clock: MockClock) -> None:
    """join_room and leave_room always confirm, also when repeated."""
    async with connect(server, "alice") as alice:
        for _ in range(2):
            assert system_reply(
                "room_joined", "alice", {"room": "R1", "action": "joined"}, room="R1"
            ) == await alice.request({"type": "join_room", "room": "R1"}, "room_joined")
        for _ in range(2):
            assert system_reply(
                "room_left", "alice", {"room": "R1", "action": "left"}, room="R1"
            ) == await alice.request({"type": "leave_room", "room": "R1"}, "room_left")


async def test_get_rooms_is_sorted_and_forgets_empty_rooms(
    server: RunningServer, autojump_clock: MockClock
) -> None:
    """rooms_list is sorted; a room is forgotten when its last member leaves."""
    async with connect(server, "alice") as alice:
        for room in ("zeta", "alpha"):
            await alice.request({"type": "join_room", "room": room}, "room_joined")
        reply = await alice.request({"type": "get_rooms"}, "rooms_list")
        assert system_reply("rooms_list", "alice", {"rooms": ["Lobby", "alpha", "zeta"]}) == reply
        await alice.request({"type": "leave_room", "room": "zeta"}, "room_left")
        reply = await alice.request({"type": "get_rooms"}, "rooms_list")
        assert ["Lobby", "alpha"] == reply["payload"]["rooms"]


async def test_leaving_stops_delivery(server: RunningServer, autojump_clock: MockClock) -> None:
    """After leave_room, room messages no longer arrive."""
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        await bob.request({"type": "leave_room", "room": "Lobby"}, "room_left")
        await alice.send({"type": "chat_message", "room": "Lobby", "payload": {"content": "x"}})
        await alice.expect("chat_message")
        assert "pong" == (await bob.request({"type": "ping"}, "pong"))["type"]


async def test_recent_messages_newest_first_with_limit_and_before(
    server: RunningServer, autojump_clock: MockClock
) -> None:
    """get_recent_messages: newest first, at most limit, strictly older than before."""
    async with connect(server, "alice") as alice:
        sent = []
        for i in range(5):
            await alice.send({"type": "chat_message", "room": "Lobby", "payload": {"content": str(i)}})
            sent.append(await alice.expect("chat_message"))
        reply = await alice.request(
            {"type": "get_recent_messages", "room": "Lobby", "payload": {"limit": 3}}, "recent_messages"
        )
        assert ("Lobby", "Lobby") == (reply["room"], reply["payload"]["room"])
        assert [sent[4], sent[3], sent[2]] == reply["payload"]["messages"]
        reply = await alice.request(
            {
                "type": "get_recent_messages",
                "room": "Lobby",
                "payload": {"before": sent[2]["createTime"]},
            },
            "recent_messages",
        )
        assert [sent[1], sent[0]] == reply["payload"]["messages"]


async def test_recent_messages_requires_membership(server: RunningServer, autojump_clock: MockClock) -> None:
    """History of a room one is not in is refused with not_in_room."""
    async with connect(server, "alice") as alice:
        await alice.send({"type": "get_recent_messages", "room": "Secret"})
        assert "not_in_room" == (await alice.expect("error"))["payload"]["code"]


async def test_limit_values(server: RunningServer, autojump_clock: MockClock) -> None:
    """limit -1 and 10**9 are clamped; "x" is invalid_payload."""
    async with connect(server, "alice") as alice:
        for i in range(3):
            await alice.send({"type": "chat_message", "room": "Lobby", "payload": {"content": str(i)}})
            await alice.expect("chat_message")
        for limit, count in ((-1, 1), (10**9, 3)):
            reply = await alice.request(
                {"type": "get_recent_messages", "room": "Lobby", "payload": {"limit": limit}},
                "recent_messages",
            )
            assert count == len(reply["payload"]["messages"])
        await alice.send({"type": "get_recent_messages", "room": "Lobby", "payload": {"limit": "x"}})
        assert "invalid_payload" == (await alice.expect("error"))["payload"]["code"]


async def test_direct_messages_oldest_first_and_limit(
    server: RunningServer, autojump_clock: MockClock
) -> None:
    """get_direct_messages: the last limit messages, oldest first; withUser required."""
    async with connect(server, "alice") as alice:
        for i in range(4):
            await alice.send({"type": "chat_message", "toUser": "bob", "payload": {"content": str(i)}})
            await alice.expect("chat_message")
        reply = await alice.request(
            {"type": "get_direct_messages", "payload": {"withUser": "bob", "limit": 2}}, "direct_messages"
        )
        assert ["2", "3"] == [m["payload"]["content"] for m in reply["payload"]["messages"]]
        await alice.send({"type": "get_direct_messages", "payload": {}})
        assert "invalid_payload" == (await alice.expect("error"))["payload"]["code"]


async def matched(server: RunningServer, a: Peer, b: Peer) -> None:
    """Pool b, let a request: a is impolite, b polite."""
    await b.send({"type": "user_available_webrtc"})
    await a.send({"type": "request_random_peer"})
    mine, theirs = await a.recv(), await b.recv()
    match_id = mine["payload"].get("matchId")
    assert isinstance(match_id, str) and match_id, "each match has an id (PROTOCOL.md section 12)"
    assert (
        system_reply(
            "assign_role",
            a.user,
            {"role": "impolite", "peerId": b.user, "matchId": match_id, "commonInterests": []},
        )
        == mine
    )
    assert (
        system_reply(
            "assign_role",
            b.user,
            {"role": "polite", "peerId": a.user, "matchId": match_id, "commonInterests": []},
        )
        == theirs
    )


async def test_matchmaking_roles_and_no_peer(server: RunningServer, autojump_clock: MockClock) -> None:
    """request_random_peer pairs with a pooled user (roles) or answers no_peer_available."""
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        reply = await alice.request({"type": "request_random_peer"}, "no_peer_available")
        assert (
            system_reply(
                "no_peer_available",
                "alice",
                {"message": "No peer available at the moment. Please try again later."},
            )
            == reply
        )
        await matched(server, alice, bob)


async def test_unavailable_leaves_the_pool(server: RunningServer, autojump_clock: MockClock) -> None:
    """user_unavailable_webrtc removes the user from the pool."""
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        await bob.send({"type": "user_available_webrtc"})
        await bob.send({"type": "user_unavailable_webrtc"})
        await bob.request({"type": "ping"}, "pong")
        await alice.request({"type": "request_random_peer"}, "no_peer_available")


async def test_signaling_relay_is_unchanged(server: RunningServer, autojump_clock: MockClock) -> None:
    """Offer/answer/candidate/hangup reach toUser with fromUser set and the payload as sent."""
    payload = {"sdp": "v=0\r\n", "nested": {"a": [1, 2.5, None, True]}, "unicode": "é🙂"}
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        for kind in ("webrtc_offer", "webrtc_answer", "webrtc_candidate", "hangup"):
            await alice.send({"type": kind, "toUser": "bob", "payload": payload})
            got = await bob.expect(kind)
            assert ("alice", "bob", payload) == (got["fromUser"], got["toUser"], got["payload"])


async def test_relay_errors(server: RunningServer, autojump_clock: MockClock) -> None:
    """Relay without toUser: invalid_target; to an offline user: peer_unavailable."""
    async with connect(server, "alice") as alice:
        await alice.send({"type": "webrtc_offer", "payload": {}})
        assert "invalid_target" == (await alice.expect("error"))["payload"]["code"]
        await alice.send({"type": "webrtc_offer", "toUser": "ghost", "payload": {}})
        assert error("alice", "peer_unavailable", "User ghost is not online.") == await alice.recv()


async def test_next_and_disconnect_send_peer_left(server: RunningServer, autojump_clock: MockClock) -> None:
    """ "Next" and a disconnect end the match and tell the peer hangup{reason: peer_left}."""
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        await matched(server, alice, bob)
        async with connect(server, "carol") as carol:
            await carol.send({"type": "user_available_webrtc"})
            await carol.request({"type": "ping"}, "pong")
            await alice.send({"type": "request_random_peer", "payload": {"currentPeerId": "bob"}})
            left = await bob.expect("hangup")
            assert ("alice", {"reason": "peer_left"}) == (left["fromUser"], left["payload"])
            assert "carol" == (await alice.expect("assign_role"))["payload"]["peerId"]
            assert "alice" == (await carol.expect("assign_role"))["payload"]["peerId"]
        left = await alice.expect("hangup")
        assert ("carol", {"reason": "peer_left"}) == (left["fromUser"], left["payload"])


async def test_crossed_request_resends_current_assignment(
    server: RunningServer, autojump_clock: MockClock
) -> None:
    """A request from a user already in a match re-sends its assign_role; no second match."""
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        await matched(server, alice, bob)
        async with connect(server, "carol") as carol:
            await carol.send({"type": "user_available_webrtc"})
            await carol.request({"type": "ping"}, "pong")
            reply = await bob.request({"type": "request_random_peer"}, "assign_role")
            assert ("polite", "alice") == (reply["payload"]["role"], reply["payload"]["peerId"])
            # carol is still available: nobody took her.
            await alice.send({"type": "user_available_webrtc"})
            await alice.send({"type": "request_random_peer"})
            # alice re-declared availability: the match ended, bob was told.
            assert "peer_left" == (await bob.expect("hangup"))["payload"]["reason"]
            assert "carol" == (await alice.expect("assign_role"))["payload"]["peerId"]


async def test_hangup_by_a_peer_is_relayed_and_ends_the_match(
    server: RunningServer, autojump_clock: MockClock
) -> None:
    """A hangup the client sends is relayed as sent; both may then match again."""
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        await matched(server, alice, bob)
        await alice.send({"type": "hangup", "toUser": "bob", "payload": {"reason": "bye"}})
        assert {"reason": "bye"} == (await bob.expect("hangup"))["payload"]
        await matched(server, bob, alice)


async def test_ping_pong(server: RunningServer, autojump_clock: MockClock) -> None:
    """Application ping is answered with pong from system (no payload)."""
    async with connect(server, "alice") as alice:
        await alice.send({"type": "ping"})
        assert {"type": "pong", "fromUser": "system", "toUser": "alice"} == await alice.recv()


async def test_room_order_is_identical_for_everyone(server: RunningServer, autojump_clock: MockClock) -> None:
    """50 clients in one room, 3 senders × 100 messages: everyone receives every message,
    each sender's messages in order, and all receivers see the same total order."""
    users = [f"u{i}" for i in range(50)]
    received: dict[str, list[tuple[str, int]]] = {u: [] for u in users}

    async def client(user: str, ready: trio.Event, go: trio.Event, sender: bool) -> None:
        async with connect(server, user) as peer:
            ready.set()
            await go.wait()
            if sender:
                for i in range(100):
                    await peer.send({"type": "chat_message", "room": "Lobby", "payload": {"content": str(i)}})
            while len(received[user]) < 300:
                message = await peer.recv(timeout=30)
                if message["type"] == "chat_message":
                    received[user].append((message["fromUser"], int(message["payload"]["content"])))

    go = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i, user in enumerate(users):
                ready = trio.Event()
                nursery.start_soon(client, user, ready, go, i < 3)
                await ready.wait()
            go.set()
    reference = received["u0"]
    assert 300 == len(reference)
    for sender in ("u0", "u1", "u2"):
        assert list(range(100)) == [n for s, n in reference if s == sender]
    for user in users:
        assert reference == received[user]
