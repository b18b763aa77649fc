"""History on Redis, through the real server and real WebSocket clients."""

from __future__ import annotations

from typing import Any

import trio
from redis_server import RedisServer
from redis_support import serve_process, server_config, wait_until
from support import SocketPeer, connect, running_server


async def _say(client: SocketPeer, room: str, text: str) -> dict[str, Any]:
    await client.send({"type": "chat_message", "room": room, "payload": {"content": text}})
    while True:
        message = await client.expect("chat_message", skip=True)
        if message["payload"] == {"content": text}:
            return message


def _contents(messages: list[dict[str, Any]]) -> list[str]:
    return [m["payload"]["content"] for m in messages]


async def test_room_history_newest_first_with_limit_and_before(redis_server: RedisServer) -> None:
    """get_recent_messages: newest first, at most ``limit``, strictly older than ``before``;
    the messages are in Redis under room:messages:{room}."""
    config = server_config(redis_server.url)
    async with running_server(config) as srv, connect(srv, "alice", "Den", skip=True) as alice:
        sent = [await _say(alice, "Den", f"m{i}") for i in range(6)]
        with redis_server.client() as r:
            await wait_until(lambda: r.zcard("room:messages:Den") == 6)
        first = await alice.request(
            {"type": "get_recent_messages", "room": "Den", "payload": {"limit": 4}},
            "recent_messages",
            skip=True,
        )
        assert ["m5", "m4", "m3", "m2"] == _contents(first["payload"]["messages"])
        assert sent[5] == first["payload"]["messages"][0]
        before = first["payload"]["messages"][-1]["createTime"]
        page = await alice.request(
            {"type": "get_recent_messages", "room": "Den", "payload": {"limit": 4, "before": before}},
            "recent_messages",
            skip=True,
        )
        assert ["m1", "m0"] == _contents(page["payload"]["messages"])


async def test_direct_history_order_and_limit(redis_server: RedisServer) -> None:
    """get_direct_messages: the last ``limit`` messages, oldest first, stored for an offline
    recipient under dm:{a}:{b} with a < b."""
    async with running_server(server_config(redis_server.url)) as srv:
        async with connect(srv, "zoe", skip=True) as zoe:
            for i in range(5):
                await zoe.send({"type": "chat_message", "toUser": "adam", "payload": {"content": f"d{i}"}})
                await zoe.expect("chat_message", skip=True)
        async with connect(srv, "adam", skip=True) as adam:
            reply = await adam.request(
                {"type": "get_direct_messages", "payload": {"withUser": "zoe", "limit": 3}},
                "direct_messages",
                skip=True,
            )
            assert "zoe" == reply["payload"]["withUser"]
            assert ["d2", "d3", "d4"] == _contents(reply["payload"]["messages"])
        with redis_server.client() as r:
            await wait_until(lambda: r.llen("dm:adam:zoe") == 5)
            assert 0 == r.exists("dm:zoe:adam")


async def test_expired_messages_are_never_returned_and_are_trimmed(
    redis_server: RedisServer,
) -> None:
    """With a sub-second TTL, old messages disappear from replies at once and are deleted
    from Redis by the next write, room and DM alike."""
    ttl = 0.6
    config = server_config(redis_server.url, message_ttl_hours=ttl / 3600)
    async with running_server(config) as srv, connect(srv, "alice", "Den", skip=True) as alice:
        await _say(alice, "Den", "old1")
        await _say(alice, "Den", "old2")
        await alice.send({"type": "chat_message", "toUser": "bob", "payload": {"content": "dm-old"}})
        await alice.expect("chat_message", skip=True)
        with redis_server.client() as r:
            await wait_until(lambda: r.zcard("room:messages:Den") == 2 and r.llen("dm:alice:bob") == 1)
            await trio.sleep(ttl + 0.1)  # let the TTL pass: the behaviour under test is time
            recent = await alice.request(
                {"type": "get_recent_messages", "room": "Den"}, "recent_messages", skip=True
            )
            assert [] == recent["payload"]["messages"]
            direct = await alice.request(
                {"type": "get_direct_messages", "payload": {"withUser": "bob"}}, "direct_messages", skip=True
            )
            assert [] == direct["payload"]["messages"]
            await _say(alice, "Den", "new")
            await alice.send({"type": "chat_message", "toUser": "bob", "payload": {"content": "dm-new"}})
            await alice.expect("chat_message", skip=True)
            await wait_until(lambda: r.zcard("room:messages:Den") == 1 and r.llen("dm:alice:bob") == 1)
            assert b"new" in r.zrange("room:messages:Den", 0, -1)[0]
            assert b"dm-new" in r.lindex("dm:alice:bob", 0)
            assert 0 < r.pttl("room:messages:Den") <= ttl * 1000


async def test_history_is_capped_per_room_and_per_dm(redis_server: RedisServer) -> None:
    """ALEATORIA_HISTORY_MAX caps each room and each DM, keeping the newest."""
    config = server_config(redis_server.url, history_max=3)
    async with running_server(config) as srv, connect(srv, "alice", "Den", skip=True) as alice:
        for i in range(5):
            await _say(alice, "Den", f"r{i}")
            await alice.send({"type": "chat_message", "toUser": "bob", "payload": {"content": f"d{i}"}})
            await alice.expect("chat_message", skip=True)
        with redis_server.client() as r:
            await wait_until(lambda: r.zcard("room:messages:Den") == 3 and r.llen("dm:alice:bob") == 3)
        recent = await alice.request(
            {"type": "get_recent_messages", "room": "Den", "payload": {"limit": 10}},
            "recent_messages",
            skip=True,
        )
        assert ["r4", "r3", "r2"] == _contents(recent["payload"]["messages"])
        direct = await alice.request(
            {"type": "get_direct_messages", "payload": {"withUser": "bob", "limit": 10}},
            "direct_messages",
            skip=True,
        )
        assert ["d2", "d3", "d4"] == _contents(direct["payload"]["messages"])


async def test_history_survives_a_restart_of_aleatoria_serve(redis_server: RedisServer) -> None:
    """Messages written by one ``aleatoria serve`` process are read by the next one."""
    async with serve_process(redis_server.url) as port, connect(port, "alice", "Den", skip=True) as alice:
        await _say(alice, "Den", "before restart")
        await alice.send({"type": "chat_message", "toUser": "bob", "payload": {"content": "dm before"}})
        await alice.expect("chat_message", skip=True)
    async with serve_process(redis_server.url) as port, connect(port, "bob", "Den", skip=True) as bob:
        recent = await bob.request(
            {"type": "get_recent_messages", "room": "Den"}, "recent_messages", skip=True
        )
        assert ["before restart"] == _contents(recent["payload"]["messages"])
        direct = await bob.request(
            {"type": "get_direct_messages", "payload": {"withUser": "alice"}}, "direct_messages", skip=True
        )
        assert ["dm before"] == _contents(direct["payload"]["messages"])
