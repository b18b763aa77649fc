"""Protocol level 2 on one instance (PROTOCOL.md section 11): the ``welcome``, presence events,
``typing`` and its limit, ``get_recent_messages`` with ``after`` -- and a level-1 client that
runs the whole original flow next to level-2 ones and never hears a type it did not ask for.
The in-memory tier (tests/inmemory.py) on trio's mock clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from inmemory import FakePeer as Peer
from inmemory import InMemoryServer, connect, inmemory_server
from trio.testing import MockClock


@pytest.fixture
async def server() -> AsyncIterator[InMemoryServer]:
    async with inmemory_server() as running:
        yield running


async def quiet(peer: Peer) -> None:
    """Nothing is waiting for ``peer`` (a ping's pong is the next frame)."""
    assert "pong" == (await peer.request({"type": "ping"}, "pong"))["type"]


async def test_welcome_comes_first(server: InMemoryServer, autojump_clock: MockClock) -> None:
    """A v=2 connection hears welcome (session id, an unguessable token, the window, who is
    online) before its room_joined; a level-1 one does not."""
    async with connect(server, "old") as old:
        await old.send({"type": "user_available_webrtc"})
        async with connect(server, "new", v=2, joined=False) as new:
            welcome = new.welcome
            assert welcome is not None
            payload = welcome["payload"]
            assert {"type": "welcome", "fromUser": "system", "toUser": "new"} == {
                k: welcome[k] for k in ("type", "fromUser", "toUser")
            }
            assert {"users": 2, "searching": 1} == payload["online"]
            assert 30 == payload["resumeWindow"]
            assert len(payload["resumeToken"]) >= 32
            assert payload["sessionId"]
            assert "iceServers" not in payload and "resumed" not in payload
            assert "room_joined" == (await new.recv())["type"]
        await quiet(old)


async def test_welcome_carries_ice_servers_when_configured() -> None:
    """With ICE servers configured, the welcome carries them (PROTOCOL.md section 14)."""
    async with (
        inmemory_server(ice_urls=("stun:stun.example.org:3478",)) as server,
        connect(server, "new", v=2) as new,
    ):
        assert new.welcome is not None
        payload = new.welcome["payload"]
        assert [{"urls": ["stun:stun.example.org:3478"]}] == payload["iceServers"]
        assert "all" == payload["iceTransportPolicy"]


async def test_members_joining_and_leaving(server: InMemoryServer, autojump_clock: MockClock) -> None:
    """member_joined / member_left about others go to the room's level-2 members only."""
    async with connect(server, "watcher", v=2) as watcher, connect(server, "legacy") as legacy:
        assert {"type": "member_joined", "fromUser": "system", "toUser": "watcher", "room": "Lobby"} | {
            "payload": {"room": "Lobby", "user": "legacy"}
        } == await watcher.recv()
        async with connect(server, "carol", "Games", v=2) as carol:
            await carol.request({"type": "join_room", "room": "Lobby"}, "room_joined")
            got = await watcher.expect("member_joined")
            assert {"room": "Lobby", "user": "carol"} == got["payload"]
            await carol.request({"type": "join_room", "room": "Lobby"}, "room_joined")  # again: no news
            await carol.request({"type": "leave_room", "room": "Lobby"}, "room_left")
            assert {"room": "Lobby", "user": "carol"} == (await watcher.expect("member_left"))["payload"]
            await carol.request({"type": "join_room", "room": "Lobby"}, "room_joined")
            await watcher.expect("member_joined")
        # carol's connection closed: she leaves Lobby (and Games, where nobody watches)
        assert {"room": "Lobby", "user": "carol"} == (await watcher.expect("member_left"))["payload"]
        await quiet(watcher)
        await quiet(legacy)


async def test_typing_to_a_room_and_its_limit(server: InMemoryServer, autojump_clock: MockClock) -> None:
    """typing goes to the room's other level-2 members, at most one a second per target;
    more are dropped silently, never stored."""
    async with (
        connect(server, "a", v=2) as a,
        connect(server, "b", v=2) as b,
        connect(server, "legacy") as legacy,
    ):
        await a.expect("member_joined")
        await a.expect("member_joined")
        await b.expect("member_joined")
        typing = {"type": "typing", "room": "Lobby", "payload": {"state": "started"}}
        await b.send(typing)
        assert {"type": "typing", "fromUser": "b", "room": "Lobby", "payload": {"state": "started"}} == (
            await a.recv()
        )
        await b.send(typing | {"payload": {"state": "stopped"}})  # within the second: dropped
        await quiet(a)
        await trio.sleep(1.0)
        await b.send(typing | {"payload": {"state": "stopped"}})
        assert {"state": "stopped"} == (await a.expect("typing"))["payload"]
        await quiet(b)
        await quiet(legacy)
        history = await a.request({"type": "get_recent_messages", "room": "Lobby"}, "recent_messages")
        assert [] == history["payload"]["messages"]


async def test_typing_to_a_user(server: InMemoryServer, autojump_clock: MockClock) -> None:
    """typing with toUser reaches a level-2 user, never a level-1 one; its limit is per target."""
    async with (
        connect(server, "a", "A", v=2) as a,
        connect(server, "b", "B", v=2) as b,
        connect(server, "legacy", "L") as legacy,
    ):
        await b.send({"type": "typing", "toUser": "legacy", "payload": {"state": "started"}})
        await b.send({"type": "typing", "toUser": "a", "payload": {"state": "started"}})
        got = await a.recv()
        assert {"type": "typing", "fromUser": "b", "toUser": "a", "payload": {"state": "started"}} == got
        await quiet(legacy)
        await quiet(a)


async def test_typing_bad_input(server: InMemoryServer, autojump_clock: MockClock) -> None:
    """A wrong state, no target or both, or a room one is not in: clear errors."""
    async with connect(server, "a", v=2) as a:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"type": "typing", "room": "Lobby", "payload": {"state": "maybe"}}, "invalid_payload"),
            ({"type": "typing", "room": "Lobby"}, "invalid_payload"),
            ({"type": "typing", "payload": {"state": "started"}}, "invalid_target"),
            (
                {"type": "typing", "room": "Lobby", "toUser": "b", "payload": {"state": "started"}},
                "invalid_target",
            ),
            ({"type": "typing", "room": "Elsewhere", "payload": {"state": "started"}}, "not_in_room"),
        ]
        for message, code in cases:
            assert code == (await a.request(message, "error"))["payload"]["code"], message


async def test_recent_messages_after(server: InMemoryServer, autojump_clock: MockClock) -> None:
    """get_recent_messages with after: strictly newer, oldest first, at most limit."""
    async with connect(server, "a") as a:
        sent = []
        for i in range(5):
            await a.send({"type": "chat_message", "room": "Lobby", "payload": {"content": str(i)}})
            sent.append(await a.expect("chat_message"))
            await trio.sleep(0.001)
        after = sent[1]["createTime"]

        async def page(**payload: Any) -> list[str]:
            reply = await a.request(
                {"type": "get_recent_messages", "room": "Lobby", "payload": payload}, "recent_messages"
            )
            return [message["payload"]["content"] for message in reply["payload"]["messages"]]

        assert ["2", "3", "4"] == await page(after=after)
        assert ["2", "3"] == await page(after=after, limit=2)
        assert ["2"] == await page(after=after, before=sent[3]["createTime"])
        assert [] == await page(after=sent[4]["createTime"])
        assert ["4", "3", "2", "1", "0"] == await page()  # without after: newest first, as before
        bad = await a.request(
            {"type": "get_recent_messages", "room": "Lobby", "payload": {"after": "yesterday"}}, "error"
        )
        assert "invalid_payload" == bad["payload"]["code"]


# The server's answers to each request of the original protocol, and what it delivers.
_ASKED_FOR = {
    "room_joined",
    "room_left",
    "rooms_list",
    "assign_role",
    "no_peer_available",
    "recent_messages",
    "direct_messages",
    "error",
    "pong",
    "chat_message",
    "webrtc_offer",
    "webrtc_answer",
    "webrtc_candidate",
    "hangup",
}


async def test_level1_hears_only_what_it_asked_for(server: InMemoryServer, autojump_clock: MockClock) -> None:
    """The whole original flow at level 1, next to level-2 users who join, leave, type, chat
    and call: every frame the level-1 client receives is of a type it asked for."""
    received: list[dict[str, Any]] = []
    async with connect(server, "old") as old, connect(server, "new", v=2) as new:
        for message in (
            {"type": "typing", "room": "Lobby", "payload": {"state": "started"}},
            {"type": "typing", "toUser": "old", "payload": {"state": "started"}},
            {"type": "join_room", "room": "Games"},
            {"type": "chat_message", "room": "Lobby", "payload": {"content": "hi"}},
            {"type": "user_available_webrtc"},
        ):
            await new.send(message)
        await old.send({"type": "join_room", "room": "Games"})
        await old.send({"type": "chat_message", "room": "Games", "payload": {"content": "x"}})
        await old.send({"type": "chat_message", "toUser": "new", "payload": {"content": "dm"}})
        await old.send({"type": "get_rooms"})
        await old.send({"type": "get_recent_messages", "room": "Lobby"})
        await old.send({"type": "get_direct_messages", "payload": {"withUser": "new"}})
        await old.send({"type": "request_random_peer"})
        await old.send({"type": "webrtc_offer", "toUser": "new", "payload": {"sdp": "o"}})
        await new.send({"type": "webrtc_answer", "toUser": "old", "payload": {"sdp": "a"}})
        await new.send({"type": "webrtc_candidate", "toUser": "old", "payload": {"candidate": ""}})
        await new.send({"type": "leave_room", "room": "Games"})
        await new.send({"type": "typing", "room": "Lobby", "payload": {"state": "stopped"}})
        await new.send({"type": "request_random_peer", "payload": {"currentPeerId": "old"}})
        await old.send({"type": "leave_room", "room": "Games"})
        await old.send({"type": "user_unavailable_webrtc"})
        await old.send({"type": "request_random_peer"})
        await old.send({"type": "ping"})
        while True:
            message = await old.recv()
            received.append(message)
            if message["type"] == "pong":
                break
        async with connect(server, "later", v=2):
            pass
        await old.send({"type": "ping"})
        while (message := await old.recv())["type"] != "pong":
            received.append(message)
    kinds = {message["type"] for message in received}
    assert kinds <= _ASKED_FOR, kinds - _ASKED_FOR
    assert {"rooms_list", "assign_role", "webrtc_answer", "hangup", "chat_message"} <= kinds
