"""``get_rooms`` (the requester's rooms, PROTOCOL.md section 4) and the level-1-safe requests
of section 11 -- ``list_rooms``, ``get_room_members``, ``get_stats`` -- on one server in
memory mode, in the in-memory tier (tests/inmemory.py). tests/scaleout/test_directory.py runs
them across instances over real sockets."""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from inmemory import Closed, connect, inmemory_server
from inmemory import FakePeer as Peer
from inmemory import InMemoryServer as RunningServer
from trio.testing import MockClock

from aleatoria.store import MemoryStore
from aleatoria.store.base import DIRECTORY_SCAN

DIRECTORY_REPLIES = {"rooms_directory", "room_members", "stats"}


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    async with inmemory_server() as running:
        yield running


def system_reply(kind: str, to: str, payload: Any, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "fromUser": "system", "toUser": to, **extra, "payload": payload}


async def join(peer: Peer, *rooms: str) -> None:
    for room in rooms:
        await peer.request({"type": "join_room", "room": room}, "room_joined")


async def directory(peer: Peer, **payload: Any) -> list[dict[str, Any]]:
    reply = await peer.request({"type": "list_rooms", "payload": payload}, "rooms_directory")
    rooms: list[dict[str, Any]] = reply["payload"]["rooms"]
    return rooms


async def error_code(peer: Peer, message: dict[str, Any]) -> str:
    reply = await peer.request(message, "error")
    code: str = reply["payload"]["code"]
    return code


async def test_get_rooms_lists_the_requesters_rooms_only(
    server: RunningServer, autojump_clock: MockClock
) -> None:
    """get_rooms answers the rooms the requester is in, sorted (as the original server did),
    not every room of the server."""
    async with connect(server, "alice") as alice, connect(server, "bob", "zoo") as bob:
        await join(alice, "zeta", "alpha")
        await join(bob, "beta")
        reply = await alice.request({"type": "get_rooms"}, "rooms_list")
        assert system_reply("rooms_list", "alice", {"rooms": ["Lobby", "alpha", "zeta"]}) == reply
        assert ["beta", "zoo"] == (await bob.request({"type": "get_rooms"}, "rooms_list"))["payload"]["rooms"]


async def test_list_rooms_is_the_directory_most_members_first(
    server: RunningServer, autojump_clock: MockClock
) -> None:
    """list_rooms: every room with members, with its member count, most members first and by
    name among equals; the reply carries no room of its own."""
    async with (
        connect(server, "alice") as alice,
        connect(server, "bob") as bob,
        connect(server, "carol", "Den") as carol,
    ):
        await join(alice, "Den", "attic")
        await join(bob, "Den", "cellar")
        reply = await carol.request({"type": "list_rooms"}, "rooms_directory")
        expected = [
            {"room": "Den", "members": 3},
            {"room": "Lobby", "members": 2},
            {"room": "attic", "members": 1},
            {"room": "cellar", "members": 1},
        ]
        assert system_reply("rooms_directory", "carol", {"rooms": expected}) == reply


async def test_list_rooms_limit_and_prefix(server: RunningServer, autojump_clock: MockClock) -> None:
    """``limit`` keeps the first rooms of the order; ``prefix`` keeps the names that start with
    it (case matters); an empty prefix is no filter."""
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        await join(alice, "game-1", "game-2", "garden", "Games")
        await join(bob, "game-2", "talk")
        assert [("Lobby", 2), ("game-2", 2)] == [
            (row["room"], row["members"]) for row in await directory(alice, limit=2)
        ]
        rows = await directory(alice, prefix="game")
        assert [("game-2", 2), ("game-1", 1)] == [(row["room"], row["members"]) for row in rows]
        assert ["game-2"] == [row["room"] for row in await directory(alice, prefix="game", limit=1)]
        assert ["Games"] == [row["room"] for row in await directory(alice, prefix="G")]
        assert [] == await directory(alice, prefix="nothing")
        assert 6 == len(await directory(alice, prefix=""))


async def test_list_rooms_limit_is_clamped(autojump_clock: MockClock) -> None:
    """``limit`` is clamped to 1..200 like every limit of the protocol; absent means 50."""
    async with inmemory_server(max_rooms_per_user=250) as server, connect(server, "alice") as alice:
        await join(alice, *(f"r{n:03d}" for n in range(204)))  # and Lobby: 205 rooms
        assert 50 == len(await directory(alice))
        assert 200 == len(await directory(alice, limit=1000))
        assert ["Lobby"] == [row["room"] for row in await directory(alice, limit=0)]
        assert ["Lobby"] == [row["room"] for row in await directory(alice, limit=-3)]


async def test_list_rooms_follows_joins_leaves_and_disconnects(
    server: RunningServer, autojump_clock: MockClock
) -> None:
    """Counts follow joins and leaves; a room whose last member left or disconnected is gone."""
    async with connect(server, "alice") as alice:
        async with connect(server, "bob", "Den") as bob:
            await join(alice, "Den")
            assert [("Den", 2), ("Lobby", 1)] == [(r["room"], r["members"]) for r in await directory(alice)]
            await alice.request({"type": "leave_room", "room": "Den"}, "room_left")
            assert [("Den", 1), ("Lobby", 1)] == [(r["room"], r["members"]) for r in await directory(bob)]
            # A call with bob, so that alice hears when the server is done with his disconnect.
            await alice.send({"type": "user_available_webrtc"})
            await alice.request({"type": "ping"}, "pong")
            await bob.request({"type": "request_random_peer"}, "assign_role")
            await alice.expect("assign_role")
        await alice.expect("hangup")
        assert [{"room": "Lobby", "members": 1}] == await directory(alice)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ([], "invalid_payload"),
        ("x", "invalid_payload"),
        ({"limit": "5"}, "invalid_payload"),
        ({"limit": 1.5}, "invalid_payload"),
        ({"limit": True}, "invalid_payload"),
        ({"prefix": 5}, "invalid_payload"),
        ({"prefix": None, "limit": []}, "invalid_payload"),
        ({"prefix": "a b"}, "invalid_payload"),
        ({"prefix": "a:"}, "invalid_payload"),
        ({"prefix": "r" * 65}, "too_large"),
    ],
)
async def test_list_rooms_refuses_bad_input(
    server: RunningServer, autojump_clock: MockClock, payload: Any, code: str
) -> None:
    """A payload of the wrong shape is invalid_payload, a prefix over 64 characters too_large;
    the connection stays usable."""
    async with connect(server, "alice") as alice:
        assert code == await error_code(alice, {"type": "list_rooms", "payload": payload})
        assert [{"room": "Lobby", "members": 1}] == await directory(alice, prefix="Lob")


async def test_get_room_members(server: RunningServer, autojump_clock: MockClock) -> None:
    """get_room_members: the exact count and the members, sorted, with the room set; only a
    member may ask (not_in_room, with the usual text); the room is required and checked."""
    async with (
        connect(server, "carol", "Den") as carol,
        connect(server, "alice", "Den") as alice,
        connect(server, "Bob") as bob,
    ):
        reply = await alice.request({"type": "get_room_members", "room": "Den"}, "room_members")
        payload = {"room": "Den", "count": 2, "members": ["alice", "carol"]}
        assert system_reply("room_members", "alice", payload, room="Den") == reply
        await join(bob, "Den")
        reply = await carol.request({"type": "get_room_members", "room": "Den"}, "room_members")
        assert {"room": "Den", "count": 3, "members": ["Bob", "alice", "carol"]} == reply["payload"]

        refused = await alice.request({"type": "get_room_members", "room": "Lobby"}, "error")
        text = "You are not in that room. Join the room first."
        assert system_reply("error", "alice", {"error": text, "code": "not_in_room"}) == refused
        assert "not_in_room" == await error_code(alice, {"type": "get_room_members", "room": "Nowhere"})
        assert "invalid_target" == await error_code(alice, {"type": "get_room_members"})
        assert "invalid_payload" == await error_code(alice, {"type": "get_room_members", "room": "a b"})
        assert "too_large" == await error_code(alice, {"type": "get_room_members", "room": "r" * 65})


async def test_room_members_lists_at_most_1000_sorted() -> None:
    """A room of 1,500 members: the count is exact and the first 1,000 names are listed, sorted
    (the memory store; the session asks for 1,000, the Redis version is tested across
    instances)."""
    store = MemoryStore(ttl_seconds=60, history_max=10)
    users = [f"user{n:04d}" for n in range(1500)]
    for user in reversed(users):
        await store.join_room("Big", user)
    count, members = await store.room_members("Big", 1000)
    assert (1500, users[:1000]) == (count, members)
    assert (0, []) == await store.room_members("Nowhere", 1000)


_member_ops = st.lists(
    st.tuples(st.sampled_from(["join", "leave", "ask"]), st.integers(0, 149)), max_size=300
)


@given(_member_ops, st.integers(1, 5))
async def test_room_members_lists_the_smallest_members_as_they_come_and_go(
    ops: list[tuple[str, int]], limit: int
) -> None:
    """However members join and leave between requests (the memory store keeps the listing
    of a room bigger than a page as they do), a request lists what sorting every member
    would: the count, and the first ``limit`` names."""
    store = MemoryStore(ttl_seconds=60, history_max=10)
    members: set[str] = set()
    for n in range(0, 150, 2):
        await store.join_room("Big", f"u{n:03d}")
        members.add(f"u{n:03d}")
    for op, n in ops:
        user = f"u{n:03d}"
        if op == "join":
            await store.join_room("Big", user)
            members.add(user)
        elif op == "leave":
            await store.leave_room("Big", user)
            members.discard(user)
        else:
            assert (len(members), sorted(members)[:limit]) == await store.room_members("Big", limit)
    assert (len(members), sorted(members)[:limit]) == await store.room_members("Big", limit)


async def test_room_members_of_a_big_room_does_not_walk_it_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Lobby of 20,000: 200 requests for its members, with members coming and going, walk
    the room once and each answer is the room's 1,000 smallest members (each request walked
    all 20,000, 4 ms: a few clients within their rate limit filled the CPU). The walks are
    counted (the store's calls of ``heapq.nsmallest``), not timed."""
    walk = heapq.nsmallest
    walks = 0

    def counted_walk(n: int, iterable: Iterable[str]) -> list[str]:
        nonlocal walks
        walks += 1
        return walk(n, iterable)

    store = MemoryStore(ttl_seconds=60, history_max=10)
    lobby = {f"user{n:05d}" for n in range(20_000)}
    for user in lobby:
        await store.join_room("Lobby", user)
    monkeypatch.setattr(heapq, "nsmallest", counted_walk)
    for n in range(200):
        if n % 50 == 0:  # members come and go meanwhile
            gone, new = f"user{n:05d}", f"a{n}"
            await store.leave_room("Lobby", gone)
            await store.join_room("Lobby", new)
            lobby = (lobby - {gone}) | {new}
            smallest = sorted(lobby)[:1000]
        count, members = await store.room_members("Lobby", 1000)
        assert (len(lobby), smallest) == (count, members)
    assert 1 == walks
    assert ["a0", "a100", "a150", "a50"] == members[:4]


async def test_get_stats(server: RunningServer, autojump_clock: MockClock) -> None:
    """get_stats: users connected, users pooled for a call, users in a live match (both sides)
    and rooms with members; the figures follow matches and disconnects."""
    async with (
        connect(server, "alice") as alice,
        connect(server, "bob", "Den") as bob,
        connect(server, "carol") as carol,
    ):
        reply = await alice.request({"type": "get_stats"}, "stats")
        payload = {"online": 3, "searching": 0, "inCalls": 0, "rooms": 2}
        assert system_reply("stats", "alice", payload) == reply
        await bob.send({"type": "user_available_webrtc"})
        await carol.send({"type": "user_available_webrtc"})
        await carol.request({"type": "ping"}, "pong")
        await bob.request({"type": "ping"}, "pong")
        stats = (await alice.request({"type": "get_stats", "payload": {"ignored": 1}}, "stats"))["payload"]
        assert {"online": 3, "searching": 2, "inCalls": 0, "rooms": 2} == stats
        matched = await alice.request({"type": "request_random_peer"}, "assign_role")
        stats = (await alice.request({"type": "get_stats"}, "stats"))["payload"]
        assert {"online": 3, "searching": 1, "inCalls": 2, "rooms": 2} == stats
        async with connect(server, "dave", "Attic"):
            stats = (await alice.request({"type": "get_stats"}, "stats"))["payload"]
            assert {"online": 4, "searching": 1, "inCalls": 2, "rooms": 3} == stats
        peer = bob if "bob" == matched["payload"]["peerId"] else carol
        await peer.disconnect()
        await alice.expect("hangup")
        stats = (await alice.request({"type": "get_stats"}, "stats"))["payload"]
        assert 0 == stats["inCalls"] and 2 == stats["online"]


async def test_a_replaced_connection_counts_once(server: RunningServer, autojump_clock: MockClock) -> None:
    """A user who connects again (the first connection is replaced, 4001) is online once,
    also once the replaced connection is gone."""
    async with connect(server, "alice") as first, connect(server, "alice") as second:
        with pytest.raises(Closed):
            await first.recv()
        assert 1 == (await second.request({"type": "get_stats"}, "stats"))["payload"]["online"]
        async with connect(server, "erin") as erin:
            assert 2 == (await erin.request({"type": "get_stats"}, "stats"))["payload"]["online"]


async def test_a_level_1_client_gets_none_of_these_unless_it_asks(
    server: RunningServer, autojump_clock: MockClock
) -> None:
    """A level-1 client (no ``v``) is never sent rooms_directory, room_members or stats on
    account of what others do or ask; it gets each only as the answer to its own request."""
    async with connect(server, "watcher") as watcher:
        async with connect(server, "alice") as alice, connect(server, "bob") as bob:
            await join(alice, "Den")
            await join(bob, "Den")
            await directory(alice)
            await alice.request({"type": "get_room_members", "room": "Lobby"}, "room_members")
            await bob.request({"type": "get_stats"}, "stats")
            await bob.request({"type": "leave_room", "room": "Den"}, "room_left")
        await watcher.send({"type": "ping"})
        seen = []
        while (message := await watcher.recv())["type"] != "pong":
            seen.append(message["type"])
        assert set() == DIRECTORY_REPLIES & set(seen)
        assert "rooms_directory" == (await watcher.request({"type": "list_rooms"}, "rooms_directory"))["type"]


_ops = st.lists(
    st.tuples(st.booleans(), st.sampled_from(["a", "ab", "b", "ba", "c"]), st.sampled_from("uvwxyz")),
    max_size=60,
)


@given(_ops, st.integers(1, 6), st.sampled_from(["", "a", "b", "ab", "z"]))
async def test_the_sorted_directory_is_the_rooms_by_size_then_name(
    ops: list[tuple[bool, str, str]], limit: int, prefix: str
) -> None:
    """Whatever joins and leaves came (twice, or of a room one is not in), the memory store's
    directory, kept sorted as they come, lists what sorting every room would: most members
    first, then by name; a prefix filters it."""
    store = MemoryStore(ttl_seconds=60, history_max=10)
    members: dict[str, set[str]] = {}
    for joining, room, user in ops:
        if joining:
            await store.join_room(room, user)
            members.setdefault(room, set()).add(user)
        else:
            await store.leave_room(room, user)
            members.get(room, set()).discard(user)
    expected = sorted(((room, len(who)) for room, who in members.items() if who), key=lambda r: (-r[1], r[0]))
    assert [r for r in expected if r[0].startswith(prefix)][:limit] == await store.list_rooms(limit, prefix)


async def test_a_prefix_is_looked_for_among_the_biggest_rooms_only() -> None:
    """A prefix walks at most DIRECTORY_SCAN rooms, biggest first, in memory mode as with
    Redis: a smaller matching room beyond them is not found, and the walk stays bounded."""
    store = MemoryStore(ttl_seconds=60, history_max=10)
    for n in range(DIRECTORY_SCAN):
        await store.join_room(f"big{n}", "u1")
        await store.join_room(f"big{n}", "u2")
    await store.join_room("rare", "u1")
    for user in ("u1", "u2", "u3"):
        await store.join_room("rare2", user)
    assert [("rare2", 3)] == await store.list_rooms(10, "rare")
    assert [("rare2", 3), ("big0", 2)] == await store.list_rooms(2)
    await store.leave_room("rare2", "u3")  # now after every big room by name: beyond the walk
    assert [] == await store.list_rooms(10, "rare")


async def test_an_instance_holds_at_most_max_rooms(autojump_clock: MockClock) -> None:
    """A new room beyond ``max_rooms`` (rooms with members here) is limit_reached, also as a
    URL's room at connect, where the connection goes on in no room; a room that exists can
    always be joined, and a room freed makes space."""
    async with inmemory_server(max_rooms=3) as server, connect(server, "alice") as alice:
        await join(alice, "r1", "r2")  # with Lobby: three
        assert "limit_reached" == await error_code(alice, {"type": "join_room", "room": "r3"})
        async with connect(server, "bob", "r1") as bob:  # r1 exists
            await join(bob, "r2")
            rooms = await bob.request({"type": "get_rooms"}, "rooms_list")
            assert ["r1", "r2"] == rooms["payload"]["rooms"]
        async with connect(server, "carol", "r9", joined=False) as carol:
            refused = await carol.expect("error")
            assert "limit_reached" == refused["payload"]["code"]
            assert [] == (await carol.request({"type": "get_rooms"}, "rooms_list"))["payload"]["rooms"]
        await alice.request({"type": "leave_room", "room": "r2"}, "room_left")
        await join(alice, "r3")
