"""Replace storms (PROTOCOL.md section 16, "exactly one live session per user"): every user
connects several times in the same moment, to one instance or to two sharing Redis, some
connections closing at once. Once it settles, each user has at most one live session, that
session gets every message of its room, and when everyone has gone nothing is left behind:
no presence, no pool place, no room membership, nobody to be matched with. Every connection
the server closes is closed as replaced (4001), also a level-2 one that was still waiting
for its welcome."""

from __future__ import annotations

import contextlib
import random
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
import trio_websocket
from health import get_json
from redis_server import RedisServer
from scaleout_support import CALM_PRESENCE, instances, redis_client, wait_until
from support import SocketPeer, connect, running_server

USERS = 50
CONNECTS = 3
ROOM = "storm"
PRESENCE = "aleatoria:presence:{available:webrtc}"
POOL = "available:webrtc"


class Conn:
    """One of a user's connections, read by its own task until the server closes it."""

    def __init__(self, user: str, index: int) -> None:
        self.user = user
        self.index = index
        self.client: SocketPeer | None = None
        self.port = 0  # the instance it is connected to
        self.joined = False
        self.closed_code: int | None = None
        self.closed_by_client = False
        self.received: list[dict[str, Any]] = []
        self.done = trio.Event()  # set once joined or closed

    @property
    def live(self) -> bool:
        return self.joined and self.closed_code is None and not self.closed_by_client


class Storm:
    def __init__(self, ports: list[int], seed: int, query: str = "") -> None:
        self.ports = ports
        self.query = query  # "&v=2": level-2 connections
        self.rng = random.Random(seed)
        self.conns: dict[str, list[Conn]] = defaultdict(list)
        self.changed = trio.Event()
        self.release = trio.Event()  # survivors close when this is set

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, predicate: Any, timeout: float = 15.0) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self.changed.wait()

    async def run_connection(self, conn: Conn, go: trio.Event, close_early: bool) -> None:
        port = self.rng.choice(self.ports)
        await go.wait()
        try:
            async with connect(port, conn.user, ROOM, joined=False, skip=True, query=self.query) as client:
                conn.port = port
                conn.client = client
                await client.send({"type": "user_available_webrtc"})
                if close_early:
                    # Closed only once the server has started this session (it reads nothing
                    # before): by then it has replaced the user's earlier connections, here
                    # or (through Redis) elsewhere, so its effects belong to this storm.
                    await client.send({"type": "ping"})
                    await client.expect("pong", skip=True)
                    conn.closed_by_client = True
                    return
                while True:
                    message = orjson.loads(await client.ws.get_message())
                    conn.received.append(message)
                    if message["type"] == "room_joined" and message.get("room") == ROOM:
                        conn.joined = True
                        conn.done.set()
                    self._changed()
                    if self.release.is_set() and conn.joined:
                        break
        except* trio_websocket.ConnectionClosed as group:
            first = group.exceptions[0]
            assert isinstance(first, trio_websocket.ConnectionClosed)
            conn.closed_code = first.reason.code if first.reason else 1006
        except* (trio_websocket.HandshakeError, OSError):
            conn.closed_code = 0
        finally:
            conn.done.set()
            self._changed()

    def live(self) -> list[Conn]:
        return [c for conns in self.conns.values() for c in conns if c.live]

    def unsettled(self) -> list[str]:
        """Users with two live sessions or a connection still waiting (for the failure)."""
        out = []
        for user, conns in self.conns.items():
            waiting = [c.index for c in conns if not (c.done.is_set() or c.closed_by_client)]
            live = [(c.index, c.port) for c in conns if c.live]
            if waiting or len(live) > 1:
                out.append(f"{user}: live {live} waiting {waiting}")
        return out

    def settled(self) -> bool:
        """Every user has at most one live connection, and every connection is joined or
        closed."""
        for conns in self.conns.values():
            if not all(c.done.is_set() or c.closed_by_client for c in conns):
                return False
            if sum(c.live for c in conns) > 1:
                return False
        return True


# A dropped level-2 session is not kept: everyone who leaves is gone at once.
_NOT_KEPT = {"resume_window": 0.0}


@asynccontextmanager
async def _servers(mode: str, redis_url: str | None) -> AsyncIterator[list[int]]:
    if mode == "memory":
        async with running_server(**_NOT_KEPT) as srv:
            yield [srv.port]
        return
    assert redis_url is not None
    async with instances(redis_url, 2 if mode == "redis-2" else 1, **CALM_PRESENCE, **_NOT_KEPT) as ports:
        yield ports


@pytest.mark.parametrize("level", ["1", "2"])
@pytest.mark.parametrize("mode", ["memory", "redis-1", "redis-2"])
async def test_replace_storm_leaves_one_session_and_no_ghosts(
    mode: str, level: str, request: pytest.FixtureRequest
) -> None:
    redis_url = None
    if mode != "memory":
        server: RedisServer = request.getfixturevalue("redis_server")
        redis_url = server.url
    query = "&v=2" if level == "2" else ""
    async with _servers(mode, redis_url) as ports:
        for seed in range(3):  # a few storms in a row on the same servers
            await _one_storm(ports, seed, redis_url, query)


async def _one_storm(ports: list[int], seed: int, redis_url: str | None, query: str) -> None:
    storm = Storm(ports, seed, query)
    go = trio.Event()
    async with trio.open_nursery() as nursery:
        for n in range(USERS):
            user = f"s{seed}u{n}"
            for index in range(CONNECTS):
                conn = Conn(user, index)
                storm.conns[user].append(conn)
                nursery.start_soon(storm.run_connection, conn, go, storm.rng.random() < 0.2)
        await trio.testing.wait_all_tasks_blocked()
        go.set()
        try:
            await _settle(storm, redis_url)
        except trio.TooSlowError:
            pytest.fail(f"not settled: {storm.unsettled()}")

        # Exactly one live session for every user who kept a connection open, and every
        # other connection the server closed was replaced (PROTOCOL.md section 5)...
        survivors = storm.live()
        assert len({c.user for c in survivors}) == len(survivors)
        codes = [
            (c.user, c.index, c.closed_code)
            for conns in storm.conns.values()
            for c in conns
            if not c.closed_by_client and c.closed_code is not None
        ]
        assert all(code == 4001 for _, _, code in codes), [c for c in codes if c[2] != 4001]
        # ...and each gets every survivor's room message, its own included.
        for conn in survivors:
            assert conn.client is not None
            await conn.client.send({"type": "chat_message", "room": ROOM, "payload": {"content": conn.user}})
        expected = {c.user for c in survivors}

        def heard(conn: Conn) -> bool:
            contents = {
                m["payload"]["content"]
                for m in conn.received
                if m["type"] == "chat_message" and m.get("room") == ROOM
            }
            return expected <= contents

        try:
            await storm.wait_for(lambda: all(heard(c) for c in survivors))
        except trio.TooSlowError:
            deaf = [c.user for c in survivors if not heard(c)]
            pytest.fail(f"sessions missing their room's messages: {deaf}")
        storm.release.set()
        for conn in survivors:  # wake the readers so they leave (closing their socket)
            assert conn.client is not None
            with contextlib.suppress(trio_websocket.ConnectionClosed):  # a reader woken already
                await conn.client.send({"type": "ping"})

    # Everyone has gone: nothing is left behind in Redis...
    users = set(storm.conns)
    if redis_url is not None:
        with redis_client(redis_url) as r:

            def clean() -> bool:
                present = {u.decode() for u in r.hkeys(PRESENCE)}
                pooled = {u.decode() for u in r.smembers(POOL)}
                members = {u.decode() for u in r.smembers("room:members:" + ROOM)}
                return not (users & (present | pooled | members))

            await wait_until(clean, timeout=10)
    # ...nor on any instance (local sessions, rooms, pool, matches)...
    deadline = trio.current_time() + 10
    while leftovers := await _leftovers(ports):
        assert trio.current_time() < deadline, leftovers
        await trio.sleep(0.05)  # the endpoints are the observable; they have no push channel
    # ...and a newcomer finds nobody to be matched with.
    for port in ports:
        async with connect(port, f"probe{seed}", skip=True) as probe:
            for _ in range(5):
                await probe.send({"type": "request_random_peer"})
                reply = await probe.recv()
                while reply["type"] not in ("assign_role", "no_peer_available"):
                    reply = await probe.recv()
                assert "no_peer_available" == reply["type"], reply


async def _settle(storm: Storm, redis_url: str | None, timeout: float = 15.0) -> None:
    """Wait until the clients have settled and the servers agree with them. A connection
    closed at once may still have replaced an earlier one through Redis: the eviction is in
    flight while every client looks settled. The servers show it: an instance still counts
    a session its client no longer has, or presence names nobody for a user whose session
    is still live (the late connection registered, then left)."""
    with trio.fail_after(timeout):
        while True:
            await storm.wait_for(storm.settled, timeout)
            if await _servers_agree(storm, redis_url):
                return
            with trio.move_on_after(0.05):  # the endpoints have no push channel
                await storm.changed.wait()


async def _servers_agree(storm: Storm, redis_url: str | None) -> bool:
    live = storm.live()
    for port in storm.ports:
        health = await get_json(port, "/health")
        if health["connections"] != sum(c.port == port for c in live):
            return False
    if redis_url is not None:
        with redis_client(redis_url) as r:
            present = {u.decode() for u in r.hkeys(PRESENCE)}
        if present & set(storm.conns) != {c.user for c in live}:
            return False
    return True


async def _leftovers(ports: list[int]) -> list[str]:
    """What any instance still holds of departed users: sessions, rooms, pool, matches."""
    found = []
    for port in ports:
        health = await get_json(port, "/health")
        if health["connections"] or health["rooms"]:
            found.append(f"{port}: {health['connections']} sessions, {health['rooms']} rooms")
        metrics = await get_text(port, "/metrics")
        for gauge in ("aleatoria_pool_size", "aleatoria_live_matches"):
            if f"\n{gauge} 0.0" not in metrics:
                found.append(f"{port}: {gauge} not 0")
    return found


async def get_text(port: int, path: str) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data.decode()
