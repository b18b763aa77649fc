"""The Redis key layout (PROTOCOL.md section 6), checked with a plain redis-py client, and
data written in the original Go server's format read back through the server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
from redis_server import RedisServer
from redis_support import server_config, wait_until
from support import connect, running_server

from aleatoria.store.redis_history import created_ns_of


def _go_time(moment: datetime) -> str:
    """RFC 3339 with nanoseconds, as Go's time.RFC3339Nano writes it (zeros trimmed)."""
    text = f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond:06d}789"
    offset = moment.strftime("%z")
    return text + ("Z" if offset == "+0000" else f"{offset[:3]}:{offset[3:]}")


async def test_key_layout_matches_the_original(redis_server: RedisServer) -> None:
    """room:messages (zset scored by createTime ns, members the delivered JSON),
    room:members, user:rooms, dm:{a}:{b} (list, a < b) and available:webrtc (set)."""
    async with running_server(server_config(redis_server.url)) as srv:
        async with (
            connect(srv, "alice", "Den", skip=True) as alice,
            connect(srv, "bob", "Den", skip=True) as bob,
            connect(srv, "carol", skip=True) as carol,
        ):
            await alice.request({"type": "join_room", "room": "Lobby"}, "room_joined", skip=True)
            await alice.send({"type": "chat_message", "room": "Den", "payload": {"content": "hello"}})
            raw = await bob.ws.get_message()
            delivered = orjson.loads(raw)
            assert "chat_message" == delivered["type"]
            await alice.send({"type": "chat_message", "toUser": "bob", "payload": {"content": "psst"}})
            dm = await bob.expect("chat_message", skip=True)
            await carol.send({"type": "user_available_webrtc"})
            await carol.request({"type": "ping"}, "pong", skip=True)
            with redis_server.client() as r:
                await wait_until(lambda: r.exists("room:messages:Den", "dm:alice:bob") == 2)
                assert b"zset" == r.type("room:messages:Den")
                [(member, score)] = r.zrange("room:messages:Den", 0, -1, withscores=True)
                assert isinstance(raw, str)
                assert raw.encode() == member  # the exact bytes delivered
                created = created_ns_of(member)
                assert created is not None
                assert abs(score - created) < 2000  # double precision and the microsecond
                assert 0 < r.ttl("room:messages:Den") <= 24 * 3600
                assert {b"alice", b"bob"} == r.smembers("room:members:Den")
                assert {b"alice", b"carol"} == r.smembers("room:members:Lobby")
                assert {b"Den", b"Lobby"} == r.smembers("user:rooms:alice")
                assert b"list" == r.type("dm:alice:bob")
                [stored_dm] = r.lrange("dm:alice:bob", 0, -1)
                expected_dm = dict(dm)
                del expected_dm["incoming"]  # each side's copy adds its own
                assert expected_dm == orjson.loads(stored_dm)
                assert {b"carol"} == r.smembers("available:webrtc")
                assert {b"Den", b"Lobby"} == r.smembers("rooms:active")

                async with connect(srv, "dave", skip=True) as dave:
                    assign = await dave.request({"type": "request_random_peer"}, "assign_role", skip=True)
                    payload = assign["payload"]
                    assert ("impolite", "carol", []) == (
                        payload["role"],
                        payload["peerId"],
                        payload["commonInterests"],
                    )
                    # The match's id lives beside the matches (section 12; a resend reads it).
                    assert {b"dave": payload["matchId"].encode(), b"carol": payload["matchId"].encode()} == (
                        r.hgetall("webrtc:match-ids:{available:webrtc}")
                    )
                    assert set() == r.smembers("available:webrtc")
                    assert {b"dave": b"carol|impolite", b"carol": b"dave|polite"} == r.hgetall(
                        "webrtc:matches:{available:webrtc}"
                    )
                    await carol.expect("assign_role", skip=True)
                # dave left: the match is gone, carol was told.
                hangup = await carol.expect("hangup", skip=True)
                assert "dave" == hangup["fromUser"]
                assert {} == r.hgetall("webrtc:matches:{available:webrtc}")
        # Everyone left: memberships are gone.
        with redis_server.client() as r:
            keys = ("room:members:Den", "room:members:Lobby", "user:rooms:alice", "rooms:active")
            await wait_until(lambda: 0 == r.exists(*keys))


async def test_reads_history_written_in_the_original_format(redis_server: RedisServer) -> None:
    """Messages the original server stored (Go JSON, createTime RFC 3339 with nanoseconds,
    any offset, sometimes ``incoming``) come back verbatim, in order, and page by ``before``."""
    now = datetime.now(UTC)
    older = {
        "type": "chat_message",
        "fromUser": "gopher",
        "room": "Den",
        "payload": {"content": "from go, older"},
        "messageId": "go-1",
        "createTime": _go_time((now - timedelta(seconds=20)).astimezone(timezone(timedelta(hours=2)))),
    }
    newer = {
        "type": "chat_message",
        "fromUser": "gopher",
        "room": "Den",
        "payload": {"content": "from go, newer"},
        "messageId": "go-2",
        "createTime": _go_time(now - timedelta(seconds=10)),
    }
    direct = {
        "type": "chat_message",
        "fromUser": "gopher",
        "toUser": "alice",
        "payload": {"content": "dm from go"},
        "messageId": "go-3",
        "createTime": _go_time(now - timedelta(seconds=5)),
        "incoming": True,
    }
    expired = dict(direct, messageId="go-0", createTime=_go_time(now - timedelta(hours=30)))
    with redis_server.client() as r:
        for message in (older, newer):
            data = orjson.dumps(message)
            score = created_ns_of(data)
            assert score is not None
            r.zadd("room:messages:Den", {data: score + 789})
        r.rpush("dm:alice:gopher", orjson.dumps(expired), orjson.dumps(direct))
    async with (
        running_server(server_config(redis_server.url)) as srv,
        connect(srv, "alice", "Den", skip=True) as alice,
    ):
        recent = await alice.request(
            {"type": "get_recent_messages", "room": "Den"}, "recent_messages", skip=True
        )
        assert [newer, older] == recent["payload"]["messages"]
        page = await alice.request(
            {"type": "get_recent_messages", "room": "Den", "payload": {"before": newer["createTime"]}},
            "recent_messages",
            skip=True,
        )
        assert [older] == page["payload"]["messages"]
        dms = await alice.request(
            {"type": "get_direct_messages", "payload": {"withUser": "gopher"}}, "direct_messages", skip=True
        )
        assert [direct] == dms["payload"]["messages"]  # the 30-hour-old one is past the TTL
        # Writing to that DM trims the expired Go entry from the head.
        await alice.send({"type": "chat_message", "toUser": "gopher", "payload": {"content": "hi"}})
        await alice.expect("chat_message", skip=True)
        with redis_server.client() as r:
            await wait_until(lambda: b'"hi"' in (r.lindex("dm:alice:gopher", -1) or b""))
            assert 2 == r.llen("dm:alice:gopher")
            assert direct == orjson.loads(r.lindex("dm:alice:gopher", 0))


def test_what_we_write_is_what_the_original_reads() -> None:
    """Our stored envelope has only the original's field names, and createTime parses as
    RFC 3339 (what Go's time.Parse(time.RFC3339Nano, ...) needs)."""
    from aleatoria import messages as m
    from aleatoria.codec import encode, now

    created_ns, created = now()
    data = encode(
        m.Envelope(
            type="chat_message",
            from_user="a",
            room="Den",
            payload={"content": "x"},
            message_id="id",
            create_time=created,
        )
    )
    decoded: dict[str, Any] = orjson.loads(data)
    assert set(decoded) <= {"type", "fromUser", "toUser", "room", "payload", "messageId", "createTime"}
    assert created_ns // 1000 * 1000 == created_ns_of(data)
