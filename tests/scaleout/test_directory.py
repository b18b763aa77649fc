"""The rooms directory across instances (PROTOCOL.md sections 9 and 11): ``list_rooms``,
``get_room_members`` and ``get_stats`` count the rooms and users of every instance sharing
one Redis (a single redis-server and a Redis Cluster of 3 masters), serve this instance's
own while Redis is down, and never reach a level-1 client that did not ask."""

from __future__ import annotations

from typing import Any

from health import wait_for_health
from redis_server import RedisServer
from scaleout_support import instances, redis_client, wait_until
from support import SocketPeer, connect

DIRECTORY_REPLIES = {"rooms_directory", "room_members", "stats"}


async def rows(client: SocketPeer, **payload: Any) -> list[tuple[str, int]]:
    reply = await client.request({"type": "list_rooms", "payload": payload}, "rooms_directory", skip=True)
    return [(row["room"], row["members"]) for row in reply["payload"]["rooms"]]


async def stats(client: SocketPeer) -> dict[str, int]:
    figures: dict[str, int] = (await client.request({"type": "get_stats"}, "stats", skip=True))["payload"]
    return figures


async def test_list_rooms_counts_every_instance(shared_redis: str) -> None:
    """Members on both instances count toward one figure per room; the order (most members,
    then name), ``limit`` and ``prefix`` hold on either instance; leaves and disconnects
    anywhere are seen everywhere."""
    async with (
        instances(shared_redis, 2) as (one, two),
        connect(one, "alice", "Den", skip=True) as alice,
        connect(two, "bob", "Den", skip=True) as bob,
        connect(two, "carol", "Attic", skip=True) as carol,
        connect(one, "dave", "Attic", skip=True) as dave,
    ):
        await dave.request({"type": "join_room", "room": "Den"}, "room_joined", skip=True)
        async with connect(two, "erin", "Cellar", skip=True):
            expected = [("Den", 3), ("Attic", 2), ("Cellar", 1)]
            assert expected == await rows(alice)
            assert expected == await rows(carol)
            assert [("Den", 3)] == await rows(carol, limit=1)
            assert [("Cellar", 1)] == await rows(alice, prefix="C")
            assert [("Attic", 2)] == await rows(bob, prefix="At", limit=5)
            assert [] == await rows(bob, prefix="d")  # names are case-sensitive
        with redis_client(shared_redis) as r:
            await wait_until(lambda: not r.exists("room:members:Cellar"))
        await bob.request({"type": "leave_room", "room": "Den"}, "room_left", skip=True)
        assert [("Attic", 2), ("Den", 2)] == await rows(alice)
        assert [("Attic", 2), ("Den", 2)] == await rows(carol)


async def test_get_room_members_lists_every_instance(shared_redis: str) -> None:
    """A member on either instance gets the room's members on both, sorted, with the exact
    count; a user not in the room is refused (not_in_room) even though the room exists."""
    async with (
        instances(shared_redis, 2) as (one, two),
        connect(one, "mia", "Den", skip=True) as mia,
        connect(two, "leo", "Den", skip=True) as leo,
        connect(two, "ada", "Attic", skip=True) as ada,
    ):
        payload = {"room": "Den", "count": 2, "members": ["leo", "mia"]}
        reply = await mia.request({"type": "get_room_members", "room": "Den"}, "room_members", skip=True)
        assert ("Den", payload) == (reply["room"], reply["payload"])
        assert (
            payload
            == (await leo.request({"type": "get_room_members", "room": "Den"}, "room_members", skip=True))[
                "payload"
            ]
        )
        refused = await ada.request({"type": "get_room_members", "room": "Den"}, "error", skip=True)
        assert "not_in_room" == refused["payload"]["code"]


async def test_a_big_room_lists_1000_members_and_counts_all(shared_redis: str) -> None:
    """A room of 1,501 members (1,500 of them written straight into Redis): ``count`` is exact,
    1,000 distinct members are listed, sorted, all of them real members; the directory shows
    the full count."""
    others = {f"user{n:04d}" for n in range(1500)}
    with redis_client(shared_redis) as r:
        r.sadd("room:members:Big", *others)
    async with instances(shared_redis, 1) as (port,), connect(port, "alice", "Big", skip=True) as alice:
        reply = await alice.request({"type": "get_room_members", "room": "Big"}, "room_members", skip=True)
        listed = reply["payload"]["members"]
        assert 1501 == reply["payload"]["count"]
        assert 1000 == len(set(listed))
        assert sorted(listed) == listed
        assert set(listed) <= others | {"alice"}
        assert [("Big", 1501)] == await rows(alice)


async def test_get_stats_counts_every_instance(shared_redis: str) -> None:
    """online, searching, inCalls and rooms add up the users and rooms of both instances; a
    match across instances counts both sides."""
    async with (
        instances(shared_redis, 2) as (one, two),
        connect(one, "alice", skip=True) as alice,
        connect(two, "bob", "Den", skip=True) as bob,
        connect(two, "carol", skip=True) as carol,
        connect(one, "dave", "Attic", skip=True) as dave,
    ):
        assert {"online": 4, "searching": 0, "inCalls": 0, "rooms": 3} == await stats(alice)
        for pooled in (bob, carol):
            await pooled.send({"type": "user_available_webrtc"})
            await pooled.sync()
        assert {"online": 4, "searching": 2, "inCalls": 0, "rooms": 3} == await stats(dave)
        await alice.request({"type": "request_random_peer"}, "assign_role", skip=True)
        assert {"online": 4, "searching": 1, "inCalls": 2, "rooms": 3} == await stats(bob)
        async with connect(two, "erin", "Cellar", skip=True):
            assert {"online": 5, "searching": 1, "inCalls": 2, "rooms": 4} == await stats(dave)


async def test_a_level_1_client_gets_none_of_these_unless_it_asks(shared_redis: str) -> None:
    """Whatever users of either instance join, leave or ask, a level-1 client (no ``v``) on
    the other instance is sent no rooms_directory, room_members or stats until it asks."""
    async with instances(shared_redis, 2) as (one, two), connect(two, "watcher", "Den", skip=True) as watcher:
        async with (
            connect(one, "alice", "Den", skip=True) as alice,
            connect(two, "bob", "Den", skip=True) as bob,
        ):
            await alice.request({"type": "join_room", "room": "Attic"}, "room_joined", skip=True)
            await rows(alice)
            await bob.request({"type": "get_room_members", "room": "Den"}, "room_members", skip=True)
            await stats(bob)
            await alice.request({"type": "leave_room", "room": "Den"}, "room_left", skip=True)
        await watcher.send({"type": "ping"})
        seen = []
        while (message := await watcher.recv())["type"] != "pong":
            seen.append(message["type"])
        assert set() == DIRECTORY_REPLIES & set(seen)
        assert "Den" in [room for room, _ in await rows(watcher)]  # asked: answered


async def test_degraded_instances_answer_for_themselves(redis_server: RedisServer) -> None:
    """With Redis down, each instance answers from its own memory: its own rooms, members
    and users only (as every read does while degraded)."""
    async with (
        instances(redis_server.url, 2) as (one, two),
        connect(one, "alice", "Den", skip=True) as alice,
        connect(one, "dave", "Den", skip=True) as dave,
        connect(two, "bob", "Den", skip=True) as bob,
        connect(two, "carol", "Attic", skip=True) as carol,
    ):
        assert [("Den", 3), ("Attic", 1)] == await rows(alice)
        redis_server.kill9()
        await wait_for_health(one, "degraded")
        await wait_for_health(two, "degraded")
        assert [("Den", 2)] == await rows(alice)
        assert [("Attic", 1), ("Den", 1)] == await rows(carol)
        reply = await dave.request({"type": "get_room_members", "room": "Den"}, "room_members", skip=True)
        assert {"room": "Den", "count": 2, "members": ["alice", "dave"]} == reply["payload"]
        assert {"online": 2, "searching": 0, "inCalls": 0, "rooms": 2} == await stats(bob)
        assert {"online": 2, "searching": 0, "inCalls": 0, "rooms": 1} == await stats(dave)


async def test_the_directory_heals_from_rooms_active(redis_server: RedisServer) -> None:
    """The sorted set behind list_rooms (single Redis) is rebuilt from ``rooms:active`` and the
    member sets when the two disagree: lost (data from before it existed), or holding a room
    nobody is in."""
    async with (
        instances(redis_server.url, 1) as (port,),
        connect(port, "alice", "Den", skip=True) as alice,
        connect(port, "bob", "Den", skip=True) as bob,
        connect(port, "carol", "Attic", skip=True) as carol,
    ):
        await bob.sync()
        with redis_server.client() as r:
            assert [(b"Den", -2.0), (b"Attic", -1.0)] == r.zrange("rooms:directory", 0, -1, withscores=True)
            r.delete("rooms:directory")
            assert [("Den", 2), ("Attic", 1)] == await rows(alice)
            r.zadd("rooms:directory", {"Ghost": -9})
            assert [("Den", 2), ("Attic", 1)] == await rows(carol)
            assert {b"Den", b"Attic"} == set(r.zrange("rooms:directory", 0, -1))
        await carol.request({"type": "leave_room", "room": "Attic"}, "room_left", skip=True)
        with redis_server.client() as r:
            assert [(b"Den", -2.0)] == r.zrange("rooms:directory", 0, -1, withscores=True)
        assert [("Den", 2)] == await rows(alice)


async def test_recovery_rewrites_the_directory(redis_server: RedisServer) -> None:
    """The recovery that rewrites each local user's rooms in Redis keeps the directory's counts
    with them: after Redis restarted empty, and after a leave made while Redis refused us."""
    async with (
        instances(redis_server.url, 1) as (port,),
        connect(port, "alice", "Den", skip=True) as alice,
        connect(port, "bob", "Den", skip=True),
        connect(port, "carol", "Attic", skip=True) as carol,
    ):
        redis_server.kill9()
        await wait_for_health(port, "degraded")
        await redis_server.restart()
        await wait_for_health(port, "ok")
        with redis_server.client() as r:
            assert [(b"Den", -2.0), (b"Attic", -1.0)] == r.zrange("rooms:directory", 0, -1, withscores=True)
            r.config_set("requirepass", "secret")
            r.client_kill_filter(_type="normal", skipme=True)
        await wait_for_health(port, "degraded")
        await carol.request({"type": "leave_room", "room": "Attic"}, "room_left", skip=True)
        await alice.request({"type": "join_room", "room": "Cellar"}, "room_joined", skip=True)
        with redis_server.client(password="secret") as r:
            r.config_set("requirepass", "")
        await wait_for_health(port, "ok")
        with redis_server.client() as r:
            assert [(b"Den", -2.0), (b"Cellar", -1.0)] == r.zrange("rooms:directory", 0, -1, withscores=True)
        assert [("Den", 2), ("Cellar", 1)] == await rows(carol)
