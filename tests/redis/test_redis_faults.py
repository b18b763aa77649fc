"""Redis failing under a running server: killed, hung, refusing auth, absent at start-up.
Live traffic goes on, /health says degraded, and on recovery Redis gets back the live state
and every message accepted meanwhile."""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
import pytest
import redis
import trio
from health import get_json, wait_for_health
from redis_server import RedisServer
from redis_support import server_config, wait_until
from support import SocketPeer, connect, running_server


class Chat:
    """``alice`` sends numbered messages to a room; ``bob`` checks each arrives, in order, and
    records its latency."""

    def __init__(self, alice: SocketPeer, bob: SocketPeer, room: str) -> None:
        self.alice = alice
        self.bob = bob
        self.room = room
        self.sent = 0
        self.received = 0
        self.latencies: list[float] = []

    async def send(self, count: int, every: float = 0.0) -> None:
        for _ in range(count):
            content = orjson.dumps({"n": self.sent, "at": trio.current_time()}).decode()
            self.sent += 1
            await self.alice.send(
                {"type": "chat_message", "room": self.room, "payload": {"content": content}}
            )
            if every:
                await trio.sleep(every)  # pacing of the traffic generator, not synchronisation

    async def receive_all(self, target: int) -> None:
        """Wait until bob has received ``target`` messages in all (in order)."""
        while self.received < target:
            message = await self.bob.expect("chat_message", skip=True)
            body = orjson.loads(message["payload"]["content"])
            assert self.received == body["n"], "lost or reordered"
            self.latencies.append(trio.current_time() - body["at"])
            self.received += 1

    async def run(self, count: int, every: float) -> None:
        """Send ``count`` messages, one every ``every`` s, while bob receives them."""
        target = self.sent + count
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.send, count, every)
            await self.receive_all(target)

    def contents(self, first: int, last: int) -> set[bytes]:
        return {str(n).encode() for n in range(first, last)}


def _numbers(r: redis.Redis, room: str) -> set[int]:
    out = set()
    for member in r.zrange(f"room:messages:{room}", 0, -1):
        assert isinstance(member, bytes)
        out.add(orjson.loads(orjson.loads(member)["payload"]["content"])["n"])
    return out


def _warnings(caplog: pytest.LogCaptureFixture, event: str) -> int:
    return sum(
        1
        for record in caplog.records
        if record.name == "aleatoria.store.redis" and f"event={event}" in record.getMessage()
    )


async def test_kill_9_mid_traffic(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """kill -9 of redis-server while a room is chatting: chat goes on, nothing crashes,
    /health says degraded (one warning); after a restart (empty) the messages accepted during
    the outage are in Redis and the pool and memberships are rebuilt."""
    caplog.set_level(logging.INFO, logger="aleatoria")
    async with (
        running_server(server_config(redis_server.url)) as srv,
        connect(srv, "alice", "Den", skip=True) as alice,
        connect(srv, "bob", "Den", skip=True) as bob,
        connect(srv, "carol", skip=True) as carol,
    ):
        await carol.send({"type": "user_available_webrtc"})
        await carol.request({"type": "ping"}, "pong", skip=True)
        chat = Chat(alice, bob, "Den")
        await chat.run(50, 0.002)
        redis_server.kill9()
        await chat.run(100, 0.002)
        await wait_for_health(srv, "degraded")
        outage_first = chat.sent
        await chat.run(100, 0.002)
        # Live state changes during the outage.
        async with connect(srv, "eve", "Attic", skip=True):
            pass
        async with connect(srv, "dave", "Attic", skip=True) as dave:
            await dave.send({"type": "user_available_webrtc"})
            await dave.request({"type": "ping"}, "pong", skip=True)
            outage_last = chat.sent
            await redis_server.restart()
            await wait_for_health(srv, "ok")
            with redis_server.client() as r:
                assert set(range(outage_first, outage_last)) <= _numbers(r, "Den")
                assert {b"carol", b"dave"} == r.smembers("available:webrtc")
                assert {b"alice", b"bob"} == r.smembers("room:members:Den")
                assert {b"dave"} == r.smembers("room:members:Attic")
                assert {b"Lobby"} == r.smembers("user:rooms:carol")
                await chat.run(10, 0)
                await wait_until(lambda: set(range(outage_first, chat.sent)) <= _numbers(r, "Den"))
    assert 1 == _warnings(caplog, "redis_degraded")
    assert 1 == _warnings(caplog, "redis_recovered")


async def test_sigstop_hang_keeps_live_chat_fast(redis_server: RedisServer) -> None:
    """SIGSTOP of redis-server (a hang longer than the call timeout): live chat p99 latency
    stays under 1 s during the stall, the store degrades, and after SIGCONT Redis holds every
    message and the pool without the user who left during the stall."""
    async with (
        running_server(server_config(redis_server.url)) as srv,
        connect(srv, "alice", "Den", skip=True) as alice,
        connect(srv, "bob", "Den", skip=True) as bob,
        connect(srv, "carol", skip=True) as carol,
    ):
        dave_leaves = trio.Event()

        async def dave_session(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with connect(srv, "dave", skip=True) as dave:
                await dave.send({"type": "user_available_webrtc"})
                await dave.request({"type": "ping"}, "pong", skip=True)
                task_status.started()
                await dave_leaves.wait()

        await carol.send({"type": "user_available_webrtc"})
        await carol.request({"type": "ping"}, "pong", skip=True)
        chat = Chat(alice, bob, "Den")
        await chat.run(50, 0.005)
        async with trio.open_nursery() as dave_nursery:
            await dave_nursery.start(dave_session)
            redis_server.freeze()
            try:
                # 3.5 s of traffic: longer than the 2 s call timeout, so the store degrades.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(chat.run, 700, 0.005)
                    await wait_for_health(srv, "degraded")
                    dave_leaves.set()  # dave leaves during the stall
            finally:
                redis_server.thaw()
        stall = chat.latencies[50:]
        await wait_for_health(srv, "ok")
        with redis_server.client() as r:
            await wait_until(lambda: _numbers(r, "Den") == set(range(chat.sent)))
            await wait_until(lambda: {b"carol"} == r.smembers("available:webrtc"))
            assert 0 == r.exists("user:rooms:dave")
    stall.sort()
    p99 = stall[math.ceil(0.99 * len(stall)) - 1]
    print(f"live chat during the stall: {len(stall)} messages, p99 {p99 * 1000:.1f} ms")
    assert p99 < 1.0, f"p99 {p99:.3f}s during the stall"


async def test_wrong_password_then_fixed(redis_binary: str, tmp_path: Any) -> None:
    """A wrong password: the server starts degraded and serves everything from memory
    (history included); once Redis accepts the password, it recovers and writes it all."""
    server = RedisServer(redis_binary, tmp_path)
    server.start(password="right")
    try:
        url = f"redis://:wrong@127.0.0.1:{server.port}/0"
        async with running_server(server_config(url)) as srv:
            assert "degraded" == (await get_json(srv, "/health"))["redis"]
            async with (
                connect(srv, "alice", "Den", skip=True) as alice,
                connect(srv, "bob", "Den", skip=True) as bob,
            ):
                chat = Chat(alice, bob, "Den")
                await chat.run(5, 0)
                recent = await alice.request(
                    {"type": "get_recent_messages", "room": "Den"}, "recent_messages", skip=True
                )
                assert 5 == len(recent["payload"]["messages"])
                with server.client() as admin:
                    admin.config_set("requirepass", "wrong")
                await wait_for_health(srv, "ok")
                server.password = "wrong"
                with server.client() as r:
                    await wait_until(lambda: _numbers(r, "Den") == set(range(5)))
                    assert {b"alice", b"bob"} == r.smembers("room:members:Den")
    finally:
        server.stop()


async def test_auth_rejected_mid_run(redis_server: RedisServer) -> None:
    """Redis starts requiring a password while the server runs: degraded, chat goes on;
    when it stops requiring one, the server recovers with nothing lost."""
    async with (
        running_server(server_config(redis_server.url)) as srv,
        connect(srv, "alice", "Den", skip=True) as alice,
        connect(srv, "bob", "Den", skip=True) as bob,
    ):
        chat = Chat(alice, bob, "Den")
        await chat.run(5, 0)
        with redis_server.client() as admin:
            admin.config_set("requirepass", "secret")
            admin.client_kill_filter(_type="normal", skipme=True)
        await chat.run(5, 0)
        await wait_for_health(srv, "degraded")
        await chat.run(5, 0)
        with redis_server.client(password="secret") as admin:
            admin.config_set("requirepass", "")
        await wait_for_health(srv, "ok")
        with redis_server.client() as r:
            await wait_until(lambda: _numbers(r, "Den") == set(range(15)))


async def test_redis_absent_at_start_then_started(
    redis_down: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """No Redis at start-up: the server starts anyway (degraded, one warning), works on
    memory, and once Redis starts it registers the live state and writes the history."""
    caplog.set_level(logging.INFO, logger="aleatoria")
    async with running_server(server_config(redis_down.url)) as srv:
        assert "degraded" == (await get_json(srv, "/health"))["redis"]
        async with (
            connect(srv, "alice", "Den", skip=True) as alice,
            connect(srv, "bob", "Den", skip=True) as bob,
            connect(srv, "carol", skip=True) as carol,
        ):
            await carol.send({"type": "user_available_webrtc"})
            await carol.request({"type": "ping"}, "pong", skip=True)
            chat = Chat(alice, bob, "Den")
            await chat.run(20, 0)
            await alice.send({"type": "chat_message", "toUser": "bob", "payload": {"content": "dm"}})
            await bob.expect("chat_message", skip=True)
            rooms = await alice.request({"type": "get_rooms"}, "rooms_list", skip=True)
            assert ["Den"] == rooms["payload"]["rooms"]
            # Matchmaking works on memory meanwhile.
            async with connect(srv, "dave", skip=True) as dave, connect(srv, "erin", skip=True) as erin:
                await erin.send({"type": "user_available_webrtc"})
                await erin.request({"type": "ping"}, "pong", skip=True)
                await dave.send({"type": "request_random_peer"})
                assigned = await dave.expect("assign_role", skip=True)
                peer = assigned["payload"]["peerId"]
                assert peer in {"carol", "erin"}
                await redis_down.restart()
                await wait_for_health(srv, "ok")
                with redis_down.client() as r:
                    assert set(range(20)) == _numbers(r, "Den")
                    assert 1 == r.llen("dm:alice:bob")
                    assert {b"carol", b"erin"} - {peer.encode()} == r.smembers("available:webrtc")
                    assert {b"alice", b"bob"} == r.smembers("room:members:Den")
                    assert f"{peer}|impolite".encode() == r.hget("webrtc:matches:{available:webrtc}", "dave")
            rooms = await alice.request({"type": "get_rooms"}, "rooms_list", skip=True)
            assert ["Den"] == rooms["payload"]["rooms"]
    assert 1 == _warnings(caplog, "redis_unavailable_at_start")
    assert 0 == _warnings(caplog, "redis_degraded")
    assert 1 == _warnings(caplog, "redis_recovered")


async def test_quick_restart_between_probes_is_noticed(redis_server: RedisServer) -> None:
    """Redis restarted (empty) with no traffic in between: the supervisor's probe notices
    (connection lost or a new run_id) and the live state is registered again."""
    async with (
        running_server(server_config(redis_server.url)) as srv,
        connect(srv, "carol", "Den", skip=True) as carol,
    ):
        await carol.send({"type": "user_available_webrtc"})
        await carol.request({"type": "ping"}, "pong", skip=True)
        redis_server.kill9()
        await redis_server.restart()
        with redis_server.client() as r:
            await wait_until(lambda: {b"carol"} == r.smembers("available:webrtc"))
            assert {b"carol"} == r.smembers("room:members:Den")
        # Registered again before the queued writes are flushed: ok comes just after.
        await wait_for_health(srv, "ok")
