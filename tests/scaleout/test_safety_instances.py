"""Safety across instances (PROTOCOL.md section 13), on a single Redis and on a Redis Cluster:
a block or ban made through instance A takes effect for a user connected to instance B, at
once (routed notices) and for later connections (the store); a user's new DM partners
counted through one instance count on the others (section 16); and a matchmaking storm of
300 users on 3 instances, where every user blocked 3 others and some are shadow-banned,
never pairs a blocked pair or a shadow-banned user with anyone else, and never hands a user
to two requesters."""

from __future__ import annotations

import random

import httpx
import pytest
import trio
import trio_websocket
from health import get_json
from scaleout_support import CALM_PRESENCE, instances, redis_client
from support import SocketPeer, connect

TOKEN = "s3cret-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MATCHES = "webrtc:matches:{available:webrtc}"


async def closed_with(client: SocketPeer) -> tuple[int, str]:
    with trio.fail_after(10):
        try:
            while True:
                await client.ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            assert exc.reason is not None
            return exc.reason.code, exc.reason.reason or ""


async def refused_status(port: int, user: str) -> int:
    async with httpx.AsyncClient() as http:
        response = await http.get(
            f"http://127.0.0.1:{port}/ws?userId={user}",
            headers={
                "connection": "upgrade",
                "upgrade": "websocket",
                "sec-websocket-version": "13",
                "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        )
    return response.status_code


async def test_block_and_ban_reach_the_other_instance(shared_redis: str) -> None:
    async with instances(shared_redis, 2, admin_token=TOKEN) as (a, b):
        async with connect(a, "alice", skip=True) as alice, connect(b, "bob", skip=True) as bob:
            await bob.send({"type": "user_available_webrtc"})
            await bob.sync()
            assert (
                "bob"
                == (await alice.request({"type": "request_random_peer"}, "assign_role", skip=True))[
                    "payload"
                ]["peerId"]
            )
            await bob.expect("assign_role", skip=True)
            await alice.request({"type": "block_user", "payload": {"user": "bob"}}, "user_blocked", skip=True)
            # The block notice travels ahead of the hangup, on the same route: once bob hears
            # peer_left, its instance knows.
            assert {"reason": "peer_left"} == (await bob.expect("hangup", skip=True))["payload"]
            for message in (
                {"type": "chat_message", "toUser": "alice", "payload": {"content": "hi"}},
                {"type": "webrtc_offer", "toUser": "alice", "payload": {"sdp": "v=0"}},
            ):
                await bob.send(message)
                assert "peer_unavailable" == (await bob.expect("error", skip=True))["payload"]["code"]
            await bob.send({"type": "user_available_webrtc"})
            await bob.sync()
            await alice.request({"type": "request_random_peer"}, "no_peer_available", skip=True)
            await alice.sync()

            # A ban through A's API closes bob on B with 4003, and both refuse him.
            async with httpx.AsyncClient() as http:
                made = await http.post(f"http://127.0.0.1:{a}/admin/bans", json={"user": "bob"}, headers=AUTH)
                assert 201 == made.status_code, made.text
                assert (4003, "banned") == await closed_with(bob)
                assert (403, 403) == (await refused_status(a, "bob"), await refused_status(b, "bob"))
                state = (await http.get(f"http://127.0.0.1:{b}/admin/users/alice", headers=AUTH)).json()
                assert (True, ["bob"]) == (state["online"], state["blocked"])
                lifted = await http.delete(f"http://127.0.0.1:{b}/admin/bans/bob", headers=AUTH)
                assert 200 == lifted.status_code
                # Kick through B of alice on A.
                kicked = await http.post(
                    f"http://127.0.0.1:{b}/admin/kick", json={"user": "alice"}, headers=AUTH
                )
                assert 200 == kicked.status_code
                assert (4003, "banned") == await closed_with(alice)
        # Later connections read the block from the store, on either instance.
        async with connect(b, "alice", skip=True) as alice, connect(a, "bob", skip=True) as bob:
            await bob.send({"type": "chat_message", "toUser": "alice", "payload": {"content": "again"}})
            assert "peer_unavailable" == (await bob.expect("error", skip=True))["payload"]["code"]
            await alice.request({"type": "get_blocked"}, "blocked_users", skip=True)


USERS = 300
BLOCKS_EACH = 3
SHADOWED = 12


@pytest.mark.slow
async def test_new_dm_count_is_the_users_on_every_instance(shared_redis: str) -> None:
    """Two partners through instance one; through instance two (a new connection) a third
    is limit_reached and a partner of the hour is fine. On a cluster too: the count's key
    (``aleatoria:dm-partners:<user>``, untagged) is the only key its script touches, and the
    store stays ok (a failing script would have degraded it and counted in memory)."""
    async with instances(shared_redis, 2, new_dm_per_hour=2) as (one, two):
        async with connect(one, "alice", skip=True) as alice:
            for to in ("p1", "p2"):
                await alice.request(_dm(to), "chat_message", skip=True)
        async with connect(two, "alice", skip=True) as alice:
            await alice.send(_dm("p3"))
            assert "limit_reached" == (await alice.expect("error", skip=True))["payload"]["code"]
            await alice.request(_dm("p1"), "chat_message", skip=True)
        assert ["ok", "ok"] == [(await get_json(port, "/health"))["redis"] for port in (one, two)]
        with redis_client(shared_redis) as r:
            assert {b"p1", b"p2"} == set(r.zrange("aleatoria:dm-partners:alice", 0, -1))


def _dm(to: str) -> dict[str, object]:
    return {"type": "chat_message", "toUser": to, "payload": {"content": "hi"}}


async def test_storm_never_pairs_blocked_or_shadowed_users(shared_redis: str) -> None:
    rng = random.Random(19)
    users = [f"k{i:03d}" for i in range(USERS)]
    blocks = {user: set(rng.sample([u for u in users if u != user], BLOCKS_EACH)) for user in users}
    shadowed = set(rng.sample(users, SHADOWED))
    clients: dict[str, SocketPeer] = {}
    assigned: dict[str, set[tuple[str, str]]] = {user: set() for user in users}
    async with (
        instances(shared_redis, 3, admin_token=TOKEN, **CALM_PRESENCE) as ports,
        trio.open_nursery() as holders,
    ):
        opened = trio.Event()
        finish = trio.Event()

        async def hold(i: int, user: str) -> None:
            async with connect(ports[i % 3], user, skip=True) as client:
                clients[user] = client
                if len(clients) == USERS:
                    opened.set()
                await finish.wait()

        for i, user in enumerate(users):
            holders.start_soon(hold, i, user)
        with trio.fail_after(60):
            await opened.wait()
        try:
            async with httpx.AsyncClient() as http:
                for user in sorted(shadowed):
                    made = await http.post(
                        f"http://127.0.0.1:{ports[0]}/admin/bans",
                        json={"user": user, "shadow": True},
                        headers=AUTH,
                    )
                    assert 201 == made.status_code

            async def block_and_pool(user: str) -> None:
                client = clients[user]
                for other in sorted(blocks[user]):
                    await client.request(
                        {"type": "block_user", "payload": {"user": other}}, "user_blocked", skip=True
                    )
                await client.send({"type": "user_available_webrtc"})
                await client.sync()

            async def request(user: str) -> None:
                client = clients[user]
                await client.send({"type": "request_random_peer"})
                await client.send({"type": "ping"})
                while True:
                    message = await client.recv()
                    if message["type"] == "assign_role":
                        payload = message["payload"]
                        assigned[user].add((payload["role"], payload["peerId"]))
                    elif message["type"] == "pong":
                        return

            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    for user in users:
                        nursery.start_soon(block_and_pool, user)
                async with trio.open_nursery() as nursery:
                    for user in users:
                        nursery.start_soon(request, user)
            with redis_client(shared_redis) as r:
                stored = await trio.to_thread.run_sync(lambda: r.hgetall(MATCHES))
        finally:
            finish.set()
    matches = {k.decode(): v.decode().split("|")[0] for k, v in stored.items()}
    assert len(matches) >= USERS // 2, "most users are matched"
    for user, peer in matches.items():
        assert matches[peer] == user, "a match is one pair"
        assert peer not in blocks[user] and user not in blocks[peer], f"{user} and {peer} blocked"
        assert (user in shadowed) == (peer in shadowed), f"{user} and {peer} across the shadow line"
    # Each user hears one assignment (a picked user that requests too hears it again:
    # the same one), and it is the stored match: never handed to two requesters.
    for user in users:
        heard = assigned[user]
        assert heard == (
            {(heard_role, matches[user]) for heard_role, _ in heard} if user in matches else set()
        )
        assert len(heard) <= 1, f"{user} was assigned {heard}"
