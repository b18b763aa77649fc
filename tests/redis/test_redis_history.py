"""History on Redis, through the real server and real WebSocket clients."""

from __future__ import annotations

from typing import Any

import orjson
import trio
from redis_server import RedisServer
from redis_support import serve_process, server_config, wait_until
from support import SocketPeer, connect, running_server

from aleatoria.core import _REPLY_ENVELOPE_BYTES, _within


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


async def test_a_history_reply_reads_about_itself_from_redis(redis_server: RedisServer) -> None:
    """200 stored messages of 32 KB (6.4 MB) in a room and in a DM: each history reply holds
    the messages that fit in ``ALEATORIA_OUTBOX_BYTES`` (1 MiB), the same ones as a cut of the
    whole history -- a room page the nearest its cursor, going on with ``before`` and with
    ``after``; a DM reply the newest -- and redis-server sends under twice that for it (its
    own count of bytes written to clients), not the 6.4 MB of 200 messages."""
    config = server_config(redis_server.url)
    room = config.outbox_bytes - _REPLY_ENVELOPE_BYTES  # what the reply's messages may take
    pad = "x" * 32_000  # content has at most 4,000 characters; the other fields count too
    async with (
        running_server(config) as srv,
        connect(srv, "alice", "Big", skip=True, max_message_size=4 * config.outbox_bytes) as alice,
    ):
        for i in range(200):
            for target in ({"room": "Big"}, {"toUser": "bob"}):
                await alice.send(
                    {"type": "chat_message", **target, "payload": {"content": str(i), "pad": pad}}
                )
                await alice.expect("chat_message", skip=True)
        with redis_server.client() as r:
            await wait_until(lambda: r.zcard("room:messages:Big") == r.llen("dm:alice:bob") == 200)
            oldest_first: list[bytes] = r.zrange("room:messages:Big", 0, -1)
            dms: list[bytes] = r.lrange("dm:alice:bob", 0, -1)

            async def read(request: dict[str, Any], reply: str) -> list[dict[str, Any]]:
                before = int(r.info("stats")["total_net_output_bytes"])
                answer = await alice.request(request, reply, skip=True)
                used.append(int(r.info("stats")["total_net_output_bytes"]) - before)
                messages: list[dict[str, Any]] = answer["payload"]["messages"]
                return messages

            def cut(stored: list[bytes], from_start: bool) -> list[dict[str, Any]]:
                kept: list[dict[str, Any]] = orjson.loads(orjson.dumps(_within(stored, room, from_start)))
                return kept

            used: list[int] = []
            for after in (False, True):
                rest = oldest_first if after else oldest_first[::-1]
                cursor = {"after": "1970-01-01T00:00:00Z"} if after else {}
                while len(rest) > 150:  # a few pages, each the messages nearest the cursor
                    request = {
                        "type": "get_recent_messages",
                        "room": "Big",
                        "payload": {"limit": 200, **cursor},
                    }
                    page = await read(request, "recent_messages")
                    assert cut(rest, from_start=True) == page
                    assert 20 < len(page) < 40
                    rest = rest[len(page) :]
                    cursor = {"after" if after else "before": page[-1]["createTime"]}
            request = {"type": "get_direct_messages", "payload": {"withUser": "bob", "limit": 200}}
            page = await read(request, "direct_messages")
            assert cut(dms, from_start=False) == page
            assert "199" == page[-1]["payload"]["content"]
        # Measured: 1.06 MB a request (1.10 MB for a page on with after: it reads the message
        # at its cursor too), against 5.4 to 6.4 MB when the whole limit was read.
        assert all(room < size < 2 * config.outbox_bytes for size in used), used
