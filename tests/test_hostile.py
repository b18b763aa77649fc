"""Holding up against hostile clients (PROTOCOL.md section 16), at the message level and at
the handshake: every finding of the attack review, reproduced against a real server over real
sockets, and refused."""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import AsyncExitStack

import jwt
import pytest
import trio
from inmemory import InMemoryServer, inmemory_server
from rawws import health, open_tcp, read_response_head, upgrade_request
from support import Peer, Target, connect, running_server
from trio.testing import MockClock, wait_all_tasks_blocked
from trio_websocket import ConnectionClosed

from aleatoria.auth import make_token
from aleatoria.core import HOUR

_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


async def still_works(*peers: Peer) -> None:
    for peer in peers:
        await peer.request({"type": "ping"}, "pong")


async def error_code(peer: Peer, message: Mapping[str, object]) -> str:
    reply = await peer.request(dict(message), "error")
    code: str = reply["payload"]["code"]
    return code


# -- memory bounds per user -------------------------------------------------------------------


async def test_rooms_per_user_are_limited() -> None:
    """Past max_rooms_per_user: limit_reached; rejoining a room one is in, or joining after
    leaving one, still works."""
    async with inmemory_server(max_rooms_per_user=3) as srv, connect(srv, "alice") as alice:
        for room in ("r1", "r2"):  # Lobby is the first
            await alice.request({"type": "join_room", "room": room}, "room_joined")
        assert "limit_reached" == await error_code(alice, {"type": "join_room", "room": "r3"})
        await alice.request({"type": "join_room", "room": "r1"}, "room_joined")  # idempotent
        await alice.request({"type": "leave_room", "room": "r1"}, "room_left")
        await alice.request({"type": "join_room", "room": "r3"}, "room_joined")
        listed = await alice.request({"type": "get_rooms"}, "rooms_list")
        assert {"Lobby", "r2", "r3"} <= set(listed["payload"]["rooms"])
        assert "r1" not in listed["payload"]["rooms"]


async def test_new_dm_conversations_per_hour_are_limited() -> None:
    """Past new_dm_per_hour new partners: limit_reached, nothing stored; writing again to a
    partner of this hour is not a new conversation."""
    async with inmemory_server(new_dm_per_hour=2) as srv, connect(srv, "alice") as alice:
        for to in ("ghost1", "ghost2"):
            await alice.request(
                {"type": "chat_message", "toUser": to, "payload": {"content": "hi"}}, "chat_message"
            )
        message = {"type": "chat_message", "toUser": "ghost3", "payload": {"content": "hi"}}
        assert "limit_reached" == await error_code(alice, message)
        again = {"type": "chat_message", "toUser": "ghost1", "payload": {"content": "again"}}
        assert "again" == (await alice.request(again, "chat_message"))["payload"]["content"]
        history = await alice.request(
            {"type": "get_direct_messages", "payload": {"withUser": "ghost3"}}, "direct_messages"
        )
        assert [] == history["payload"]["messages"]


def dm(to: str, content: str = "hi") -> dict[str, object]:
    return {"type": "chat_message", "toUser": to, "payload": {"content": content}}


@pytest.mark.loopback  # real sockets: the user really goes away and comes back
async def test_new_dm_count_survives_a_reconnect() -> None:
    """The count of new DM partners is the user's, not its connection's (a red-team script
    reached 600 new partners in one hour by reconnecting): after 3 partners and a fresh
    connection, a 4th is limit_reached and nothing is stored; a partner of this hour is
    still fine."""
    async with (
        running_server(new_dm_per_hour=3) as srv,
        connect(srv, "watch", "Den", query="&v=2", skip=True) as watch,
    ):
        async with connect(srv, "alice", "Den") as alice:
            for to in ("p1", "p2", "p3"):
                await alice.request(dm(to), "chat_message")
        # Gone for good (not replaced): nothing of the old connection carries over.
        assert {"room": "Den", "user": "alice"} == (await watch.expect("member_left", skip=True))["payload"]
        async with connect(srv, "alice", "Den") as alice:
            assert "limit_reached" == await error_code(alice, dm("p4"))
            assert "again" == (await alice.request(dm("p1", "again"), "chat_message"))["payload"]["content"]
            history = await alice.request(
                {"type": "get_direct_messages", "payload": {"withUser": "p4"}}, "direct_messages"
            )
            assert [] == history["payload"]["messages"]


async def test_new_dm_count_frees_up_an_hour_after_each_first_write(autojump_clock: MockClock) -> None:
    """Each partner counts for an hour from the user's first DM to it, whatever its
    connections: then a new partner may take its place, and the partner itself is new again."""
    async with inmemory_server(new_dm_per_hour=3, idle_timeout=2 * HOUR) as srv:
        async with connect(srv, "alice") as alice:
            await alice.request(dm("p1"), "chat_message")
        autojump_clock.jump(HOUR / 2)
        async with connect(srv, "alice") as alice:
            for to in ("p2", "p3"):
                await alice.request(dm(to), "chat_message")
            assert "limit_reached" == await error_code(alice, dm("p4"))
            autojump_clock.jump(HOUR / 2)  # p1's hour is over, p2's and p3's are not
            await alice.request(dm("p4"), "chat_message")
            assert "limit_reached" == await error_code(alice, dm("p1"))  # new again: one too many
            await alice.request(dm("p2", "still"), "chat_message")
        autojump_clock.jump(HOUR / 2)  # p2's and p3's hours are over too
        async with connect(srv, "alice") as alice:
            for to in ("p1", "p5"):
                await alice.request(dm(to), "chat_message")
            assert "limit_reached" == await error_code(alice, dm("p6"))


def report(user: str) -> dict[str, object]:
    return {"type": "report_user", "payload": {"user": user, "reason": "spam"}}


async def reports_filed(srv: InMemoryServer, reporter: str) -> int:
    filed = await srv.server.store.safety.reports(100)
    return sum(1 for one in filed if one["reporter"] == reporter)


async def test_reports_an_hour_are_limited(autojump_clock: MockClock) -> None:
    """Past reports_per_hour reports within the hour of a user's first: limit_reached with
    its text, nothing stored and nobody blocked; other users are not limited by it; once that
    hour is over the user may report again, across its connections."""
    async with inmemory_server(reports_per_hour=3, idle_timeout=2 * HOUR) as srv:
        async with connect(srv, "alice") as alice:
            for troll in ("t1", "t2"):
                await alice.request(report(troll), "report_received")
        autojump_clock.jump(HOUR / 2)
        async with connect(srv, "alice") as alice, connect(srv, "bob") as bob:
            await alice.request(report("t3"), "report_received")
            refusal = await alice.request(report("t4"), "error")
            assert {
                "code": "limit_reached",
                "error": "You have filed too many reports in the last hour; try again later.",
            } == refusal["payload"]
            blocked = await alice.request({"type": "get_blocked"}, "blocked_users")
            assert ["t1", "t2", "t3"] == blocked["payload"]["users"]  # t4 is not blocked
            await bob.request(report("t4"), "report_received")  # bob's count is his own
            assert 3 == await reports_filed(srv, "alice")
            autojump_clock.jump(HOUR / 2 - 1)
            assert "limit_reached" == await error_code(alice, report("t4"))
            autojump_clock.jump(1)  # the hour of her first report is over
            for troll in ("t4", "t5", "t6"):
                await alice.request(report(troll), "report_received")
            assert "limit_reached" == await error_code(alice, report("t7"))
        assert 6 == await reports_filed(srv, "alice")


@pytest.mark.loopback  # real sockets: the user really goes away and comes back
async def test_report_count_survives_a_reconnect() -> None:
    """The count of reports filed is the user's, not its connection's: after 3 reports and a
    fresh connection, a 4th is limit_reached and goes no further (its user is not blocked)."""
    async with (
        running_server(reports_per_hour=3) as srv,
        connect(srv, "watch", "Den", query="&v=2", skip=True) as watch,
    ):
        async with connect(srv, "alice", "Den") as alice:
            for troll in ("t1", "t2", "t3"):
                await alice.request(report(troll), "report_received")
        # Gone for good (not replaced): nothing of the old connection carries over.
        assert {"room": "Den", "user": "alice"} == (await watch.expect("member_left", skip=True))["payload"]
        async with connect(srv, "alice", "Den") as alice:
            assert "limit_reached" == await error_code(alice, report("t4"))
            blocked = await alice.request({"type": "get_blocked"}, "blocked_users")
            assert ["t1", "t2", "t3"] == blocked["payload"]["users"]


async def test_payload_fields_beyond_content_count_toward_the_payload_limit() -> None:
    """A 60,000-character extra field (content itself short) is too_large: neither stored
    nor relayed."""
    async with inmemory_server() as srv, connect(srv, "alice") as alice, connect(srv, "bob") as bob:
        payload = {"content": "hi", "extra": "x" * 60_000}
        for target in ({"toUser": "bob"}, {"room": "Lobby"}):
            message = {"type": "chat_message", **target, "payload": payload}
            assert "too_large" == await error_code(alice, message)
        await still_works(bob)  # the pong is bob's next frame: nothing was relayed to him
        dms = await bob.request(
            {"type": "get_direct_messages", "payload": {"withUser": "alice"}}, "direct_messages"
        )
        assert [] == dms["payload"]["messages"]
        room = await bob.request({"type": "get_recent_messages", "room": "Lobby"}, "recent_messages")
        assert [] == room["payload"]["messages"]
        # Just under the limit goes through, 4,000 characters of any script with room to spare.
        fine = {
            "type": "chat_message",
            "toUser": "bob",
            "payload": {"content": "é" * 4000, "extra": "y" * 20_000},
        }
        await alice.request(fine, "chat_message")
        assert "é" * 4000 == (await bob.expect("chat_message"))["payload"]["content"]


# -- JSON stays JSON ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "number",
    ["1e400", "-1e400", "123456789012345678901234567890", "18446744073709551616"],
)
async def test_non_finite_and_oversized_numbers_are_refused_and_never_stored(number: str) -> None:
    async with inmemory_server() as srv, connect(srv, "alice") as alice, connect(srv, "bob") as bob:
        frame = (
            '{"type":"chat_message","room":"Lobby","payload":{"content":"x","n":' + number + ',"big":'
            "123456789012345678901234567890}}"
        )
        await alice.send(frame)
        reply = await alice.expect("error_response")
        assert "Invalid message structure" == reply["payload"]["error"]
        await still_works(bob)
        stored = await bob.request({"type": "get_recent_messages", "room": "Lobby"}, "recent_messages")
        assert [] == stored["payload"]["messages"]


# -- calls and identities ----------------------------------------------------------------------------


async def test_signaling_into_someone_elses_call_is_refused() -> None:
    """While A and B are matched, C's offer, candidate or hangup to A is peer_unavailable and
    the call goes on; B's signaling still reaches A."""
    async with (
        inmemory_server() as srv,
        connect(srv, "alice") as alice,
        connect(srv, "bob") as bob,
        connect(srv, "carol") as carol,
    ):
        await bob.send({"type": "user_available_webrtc"})
        await still_works(bob)
        assigned = await alice.request({"type": "request_random_peer"}, "assign_role")
        assert "bob" == assigned["payload"]["peerId"]
        await bob.expect("assign_role")
        for kind, payload in (
            ("webrtc_offer", {"sdp": "v=0"}),
            ("webrtc_candidate", {"candidate": "candidate:1 1 udp 1 1.2.3.4 5 typ host"}),
            ("hangup", {"reason": "peer_left"}),
        ):
            message = {"type": kind, "toUser": "alice", "payload": payload}
            assert "peer_unavailable" == await error_code(carol, message)
        await bob.send({"type": "webrtc_offer", "toUser": "alice", "payload": {"sdp": "v=0 bob"}})
        offer = await alice.expect("webrtc_offer")
        assert ("bob", {"sdp": "v=0 bob"}) == (offer["fromUser"], offer["payload"])
        # Bob is in the call too; once it ends, anyone may reach him (the original behaviour).
        await carol.send({"type": "webrtc_offer", "toUser": "bob", "payload": {}})
        assert "peer_unavailable" == (await carol.expect("error"))["payload"]["code"]
        await alice.send({"type": "hangup", "toUser": "bob", "payload": {}})
        await bob.expect("hangup")
        await carol.send({"type": "webrtc_offer", "toUser": "bob", "payload": {}})
        assert "carol" == (await bob.expect("webrtc_offer"))["fromUser"]


async def upgrade_with_host(server: Target, target: str, host: str, origin: str | None) -> int:
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {_KEY}",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    async with open_tcp(server) as conn:
        await conn.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        return (await read_response_head(conn)).status


async def test_the_user_id_system_is_reserved(server: InMemoryServer) -> None:
    assert 400 == await upgrade_with_host(server, "/ws?userId=system", f"127.0.0.1:{server.port}", None)
    assert 101 == await upgrade_with_host(server, "/ws?userId=systems", f"127.0.0.1:{server.port}", None)


async def test_dns_rebinding_is_refused_and_the_local_demo_page_still_works(server: InMemoryServer) -> None:
    """A page at http://evil.example:PORT whose name now resolves to 127.0.0.1 sends Host and
    Origin both naming evil.example: same-origin, but not one of our hosts: 403."""
    port = server.port
    target = "/ws?userId=alice"
    assert 403 == await upgrade_with_host(
        server, target, f"evil.example:{port}", f"http://evil.example:{port}"
    )
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        origin = f"http://{host}"
        assert 101 == await upgrade_with_host(server, target, host, origin), host
    assert 101 == await upgrade_with_host(server, target, f"evil.example:{port}", None)  # not a browser


async def test_allowed_hosts_lists_a_proxy_public_name() -> None:
    async with inmemory_server(allowed_hosts=("chat.example.com",)) as srv:
        port = srv.port
        target = "/ws?userId=alice"
        ok = await upgrade_with_host(srv, target, "chat.example.com", "https://chat.example.com")
        assert 101 == ok
        assert 403 == await upgrade_with_host(srv, target, f"localhost:{port}", f"http://localhost:{port}")
    async with inmemory_server(allowed_hosts=("*",)) as srv:
        origin = f"http://evil.example:{srv.port}"
        assert 101 == await upgrade_with_host(srv, target, f"evil.example:{srv.port}", origin)


# -- tokens on live connections ----------------------------------------------------------------------

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def _token(user: str, seconds: float) -> str:
    now = time.time()
    return jwt.encode({"sub": user, "iat": int(now), "exp": now + seconds}, SECRET, algorithm="HS256")


async def test_a_token_that_expires_closes_the_connection_with_4002() -> None:
    token = _token("alice", 1.5)
    async with inmemory_server(auth_secret=SECRET) as srv, connect(srv, f"alice&token={token}") as alice:
        started = trio.current_time()
        with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
            while True:
                await alice.ws.get_message()
        reason = closed.value.reason
        assert reason is not None
        assert (4002, "token expired") == (reason.code, reason.reason)
        assert 0.5 < trio.current_time() - started < 4


async def test_refresh_token_keeps_the_connection_open() -> None:
    """A valid refresh for the same user moves the deadline; a refused one changes nothing."""
    token = _token("alice", 1.5)
    async with inmemory_server(auth_secret=SECRET) as srv, connect(srv, f"alice&token={token}") as alice:
        for bad in (_token("bob", 60), "nonsense", make_token("alice", "other-secret" * 4, 60)):
            reply = await alice.request({"type": "refresh_token", "payload": {"token": bad}}, "error")
            assert "invalid_token" == reply["payload"]["code"]
        fresh = _token("alice", 60)
        reply = await alice.request({"type": "refresh_token", "payload": {"token": fresh}}, "token_refreshed")
        assert jwt.decode(fresh, SECRET, algorithms=["HS256"])["exp"] // 1 == reply["payload"]["exp"]
        # Past the first token's expiry (and two supervisor ticks) the connection works.
        with trio.move_on_after(3.5):
            message = await alice.ws.get_message()
            pytest.fail(f"unexpected {message!r}")
        await still_works(alice)


# -- half-open connections ---------------------------------------------------------------------------


@pytest.mark.loopback  # caps by peer address, counted from accept
async def test_idle_sockets_from_one_address_are_capped_from_accept() -> None:
    """An attacker's address holds at most max_connections_per_ip sockets, upgraded or not;
    past that it gets 503 at once. /health and other addresses are served meanwhile."""
    async with running_server(max_connections_per_ip=20, handshake_timeout=30.0) as srv:
        idle: list[trio.socket.SocketType] = []
        try:
            for _ in range(20):
                sock = trio.socket.socket()
                await sock.bind(("127.0.0.2", 0))  # the attacker's own address
                await sock.connect(("127.0.0.1", srv.port))
                idle.append(sock)
            with trio.fail_after(2):
                for _ in range(5):
                    with trio.socket.socket() as sock:
                        await sock.bind(("127.0.0.2", 0))
                        await sock.connect(("127.0.0.1", srv.port))
                        assert (await sock.recv(4096)).startswith(b"HTTP/1.1 503 ")
                assert "ok" == (await health(srv))["status"]
                async with connect(srv, "calm") as calm:
                    await still_works(calm)
        finally:
            for sock in idle:
                sock.close()


@pytest.mark.loopback  # sockets counted from accept, as the listener accepts them
async def test_a_burst_over_the_connection_cap_lets_the_first_sockets_in() -> None:
    """20 upgrades at once at max_connections=10: the ten sockets accepted first get their
    WebSocket, the ten after them 503. (Each upgrade used to count all 20 sockets accepted
    by then, so every one of them got 503 and the server stood empty.)"""
    async with running_server(max_connections=10) as srv, AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(open_tcp(srv)) for _ in range(20)]
        # All 20 accepted before any request head arrives (the server runs in this trio run:
        # once every task is blocked, its accept loop has taken them all). Without this the
        # test still holds; with it, it tells the two rules apart.
        await wait_all_tasks_blocked()
        for index, conn in enumerate(conns):
            await conn.send(upgrade_request(srv.port, f"/ws?userId=u{index}"))
        with trio.fail_after(5):
            statuses = [(await read_response_head(conn)).status for conn in conns]
        assert [101] * 10 + [503] * 10 == statuses


@pytest.mark.loopback  # caps by peer address, counted from accept
async def test_health_answers_while_the_server_is_full() -> None:
    """At max_connections (half-open sockets count), upgrades get 503 and /health answers."""
    async with running_server(max_connections=10, handshake_timeout=30.0) as srv:
        idle = []
        try:
            for _ in range(10):
                sock = trio.socket.socket()
                await sock.connect(("127.0.0.1", srv.port))
                idle.append(sock)
            with trio.fail_after(2):
                assert "ok" == (await health(srv))["status"]
                async with open_tcp(srv) as conn:
                    await conn.send(upgrade_request(srv.port, "/ws?userId=late"))
                    assert 503 == (await read_response_head(conn)).status
        finally:
            for sock in idle:
                sock.close()
