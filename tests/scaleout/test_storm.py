"""Matchmaking storms across instances: 300 users on 3 instances all ask for a peer at once,
several rounds in a row. Nobody is ever handed to two requesters, and every pairing is seen
identically by both sides (roles complementary), on a single Redis and on a Redis Cluster."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable

import trio
from scaleout_support import CALM_PRESENCE, instances, redis_client
from support import SocketPeer, connect

USERS = 300
ROUNDS = 4
MATCHES = "webrtc:matches:{available:webrtc}"


class Storm:
    def __init__(self) -> None:
        self.clients: dict[str, SocketPeer] = {}
        self.seen: dict[str, list[tuple[str, str]]] = {}  # user -> (role, peer) received this round
        self.no_peer: Counter[str] = Counter()
        self.expected: dict[str, str] = {}

    async def read_until_pong(self, client: SocketPeer) -> None:
        while True:
            message = await client.recv()
            if message["type"] == "assign_role":
                payload = message["payload"]
                self.seen[client.user].append((payload["role"], payload["peerId"]))
            elif message["type"] == "no_peer_available":
                self.no_peer[client.user] += 1
            elif message["type"] == "pong":
                return

    async def read_until_partner(self, client: SocketPeer) -> None:
        partner = self.expected.get(client.user)
        while partner is not None and partner not in {peer for _, peer in self.seen[client.user]}:
            message = await client.recv()
            if message["type"] == "assign_role":
                payload = message["payload"]
                self.seen[client.user].append((payload["role"], payload["peerId"]))


async def _barrier(users: list[str], step: Callable[[str], Awaitable[object]]) -> None:
    async with trio.open_nursery() as nursery:
        for user in users:
            nursery.start_soon(step, user)


async def test_request_storms_on_three_instances(shared_redis: str) -> None:
    users = [f"s{i:03d}" for i in range(USERS)]
    storm = Storm()
    async with instances(shared_redis, 3, **CALM_PRESENCE) as ports, trio.open_nursery() as holders:
        opened = trio.Event()
        finish = trio.Event()
        count = 0

        async def hold(i: int, user: str) -> None:
            nonlocal count
            async with connect(ports[i % 3], user, skip=True) as client:
                storm.clients[user] = client
                count += 1
                if count == USERS:
                    opened.set()
                await finish.wait()

        for i, user in enumerate(users):
            holders.start_soon(hold, i, user)
        with trio.fail_after(60):
            await opened.wait()
        try:
            with redis_client(shared_redis) as r:
                for _ in range(ROUNDS):
                    await _round(storm, users, r)
        finally:
            finish.set()


async def _round(storm: Storm, users: list[str], r: object) -> None:
    clients = storm.clients
    storm.seen = {user: [] for user in users}
    storm.no_peer.clear()

    async def pool(user: str) -> None:
        await clients[user].send({"type": "user_available_webrtc"})
        await clients[user].send({"type": "ping"})
        await storm.read_until_pong(clients[user])

    async def request(user: str) -> None:
        await clients[user].send({"type": "request_random_peer"})
        await clients[user].send({"type": "ping"})
        await storm.read_until_pong(clients[user])

    with trio.fail_after(60):
        await _barrier(users, pool)  # also ends last round's matches
        storm.seen = {user: [] for user in users}
        await _barrier(users, request)
        stored = await trio.to_thread.run_sync(lambda: r.hgetall(MATCHES))  # type: ignore[attr-defined]
        storm.expected = {k.decode(): v.decode().split("|")[0] for k, v in stored.items()}
        await _barrier(users, lambda user: storm.read_until_partner(clients[user]))
    matched = storm.expected
    assert len(matched) >= USERS - 2, "almost everyone is matched in a storm of requests"
    for user in users:
        seen = set(storm.seen[user])
        partner = matched.get(user)
        if partner is None:
            assert set() == seen, f"{user} unmatched but told {seen}"
            assert storm.no_peer[user] >= 1
            continue
        assert 1 == len(seen), f"{user} was assigned {seen}"  # once, or the same twice (resend)
        [(role, peer)] = seen
        assert partner == peer
        assert matched[peer] == user
        [(other_role, other_peer)] = set(storm.seen[peer])
        assert (user, {role, other_role}) == (other_peer, {"impolite", "polite"})
