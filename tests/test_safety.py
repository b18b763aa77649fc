"""Every row of PROTOCOL.md section 13 on the in-memory tier (the real store, hub, router and
sessions with a recording socket, on trio's mock clock): block, unblock, get_blocked,
report_user with its evidence, bans and shadow bans (through ``Moderation``, as the admin
API calls it), the automatic shadow ban and the skip limit. The Redis and cross-instance
cases are tests/redis/test_redis_safety.py and tests/scaleout/test_safety_instances.py."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import orjson
import pytest
from inmemory import Closed, FakePeer, InMemoryServer, connect, inmemory_server
from report_scenarios import the_evidence_a_report_reads, the_match_a_report_records
from support import Peer
from trio.testing import MockClock

from aleatoria import core
from aleatoria.limits import TokenBucket, forget_full
from aleatoria.safety import EVIDENCE_BYTES, MAX_BLOCKS, Ban


@pytest.fixture
async def server() -> AsyncIterator[InMemoryServer]:
    async with inmemory_server() as running:
        yield running


def reply(kind: str, to: str, payload: Any) -> dict[str, Any]:
    return {"type": kind, "fromUser": "system", "toUser": to, "payload": payload}


async def code_of(peer: FakePeer, message: dict[str, Any]) -> str:
    await peer.send(message)
    return str((await peer.expect("error"))["payload"]["code"])


async def pooled(*peers: FakePeer) -> None:
    for peer in peers:
        await peer.send({"type": "user_available_webrtc"})
        await peer.request({"type": "ping"}, "pong")


async def match(alice: FakePeer, bob: FakePeer) -> None:
    await pooled(bob)
    assert "bob" == (await alice.request({"type": "request_random_peer"}, "assign_role"))["payload"]["peerId"]
    assert "alice" == (await bob.expect("assign_role"))["payload"]["peerId"]


async def test_block_unblock_and_get_blocked_shapes(
    server: InMemoryServer, autojump_clock: MockClock
) -> None:
    async with connect(server, "alice") as alice:
        for other in ("zed", "bob"):
            got = await alice.request({"type": "block_user", "payload": {"user": other}}, "user_blocked")
            assert reply("user_blocked", "alice", {"user": other}) == got
        # Blocking twice is no error (and no second entry).
        await alice.request({"type": "block_user", "payload": {"user": "bob"}}, "user_blocked")
        got = await alice.request({"type": "get_blocked"}, "blocked_users")
        assert reply("blocked_users", "alice", {"users": ["bob", "zed"]}) == got
        got = await alice.request({"type": "unblock_user", "payload": {"user": "zed"}}, "user_unblocked")
        assert reply("user_unblocked", "alice", {"user": "zed"}) == got
        assert {"users": ["bob"]} == (await alice.request({"type": "get_blocked"}, "blocked_users"))[
            "payload"
        ]


async def test_block_input_errors(server: InMemoryServer, autojump_clock: MockClock) -> None:
    async with connect(server, "alice") as alice:
        assert "invalid_payload" == await code_of(alice, {"type": "block_user", "payload": {"user": "alice"}})
        assert "invalid_payload" == await code_of(alice, {"type": "block_user"})
        assert "invalid_payload" == await code_of(alice, {"type": "block_user", "payload": {"user": 5}})
        assert "invalid_payload" == await code_of(alice, {"type": "block_user", "payload": {"user": "a b"}})
        assert "too_large" == await code_of(alice, {"type": "unblock_user", "payload": {"user": "x" * 65}})


async def test_blocked_user_cannot_write_to_the_blocker(
    server: InMemoryServer, autojump_clock: MockClock
) -> None:
    """DMs and signaling from the blocked user: peer_unavailable, as if offline, and the DM is
    not stored; the blocker still writes to anyone."""
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        await alice.request({"type": "block_user", "payload": {"user": "bob"}}, "user_blocked")
        dm = {"type": "chat_message", "toUser": "alice", "payload": {"content": "hi"}}
        await bob.send(dm)
        assert reply("error", "bob", {"error": "User alice is not online.", "code": "peer_unavailable"}) == (
            await bob.recv()
        )
        for kind in ("webrtc_offer", "webrtc_answer", "webrtc_candidate", "hangup"):
            assert "peer_unavailable" == await code_of(bob, {"type": kind, "toUser": "alice", "payload": {}})
        history = await alice.request(
            {"type": "get_direct_messages", "payload": {"withUser": "bob"}}, "direct_messages"
        )
        assert [] == history["payload"]["messages"]
        # Nothing reached alice: her next message is the pong.
        await alice.request({"type": "ping"}, "pong")
        await alice.send({"type": "chat_message", "toUser": "bob", "payload": {"content": "bye"}})
        assert "bye" == (await bob.expect("chat_message"))["payload"]["content"]
        await alice.expect("chat_message")  # her own copy
        await alice.request({"type": "unblock_user", "payload": {"user": "bob"}}, "user_unblocked")
        await bob.send(dm)
        assert "hi" == (await alice.expect("chat_message"))["payload"]["content"]


async def test_a_block_stops_the_dms_of_a_partner_of_this_hour(
    server: InMemoryServer, autojump_clock: MockClock
) -> None:
    """Bob has written to alice this hour, so his next DM to her takes the one-pass path
    (``core.plain_dm``); once she blocks him, that DM is refused as the first one would be,
    and is neither delivered nor stored."""
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        dm = {"type": "chat_message", "toUser": "alice", "payload": {"content": "hi"}}
        for _ in range(2):  # the first counts the partner, the second is the usual DM
            await bob.send(dm)
            assert "hi" == (await alice.expect("chat_message"))["payload"]["content"]
            await bob.expect("chat_message")  # his own copy
        await alice.request({"type": "block_user", "payload": {"user": "bob"}}, "user_blocked")
        await bob.send(dict(dm, payload={"content": "still there?"}))
        assert reply("error", "bob", {"error": "User alice is not online.", "code": "peer_unavailable"}) == (
            await bob.recv()
        )
        history = await alice.request(
            {"type": "get_direct_messages", "payload": {"withUser": "bob"}}, "direct_messages"
        )
        assert ["hi", "hi"] == [message["payload"]["content"] for message in history["payload"]["messages"]]


async def test_block_reaches_a_connection_made_later(
    server: InMemoryServer, autojump_clock: MockClock
) -> None:
    """The blocked user reads its blocks at the handshake: reconnecting changes nothing."""
    async with connect(server, "alice") as alice:
        await alice.request({"type": "block_user", "payload": {"user": "bob"}}, "user_blocked")
        async with connect(server, "bob") as bob:
            dm = {"type": "chat_message", "toUser": "alice", "payload": {"content": "hi"}}
            assert "peer_unavailable" == await code_of(bob, dm)


async def test_block_ends_the_live_match_and_prevents_the_next(
    server: InMemoryServer, autojump_clock: MockClock
) -> None:
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        await match(alice, bob)
        await alice.request({"type": "block_user", "payload": {"user": "bob"}}, "user_blocked")
        left = await bob.expect("hangup")
        assert ("alice", {"reason": "peer_left"}) == (left["fromUser"], left["payload"])
        # Never matched again, in either direction.
        await pooled(bob)
        await alice.request({"type": "request_random_peer"}, "no_peer_available")
        await pooled(alice)
        await bob.request({"type": "request_random_peer"}, "no_peer_available")
        async with connect(server, "carol") as carol:
            await pooled(carol)
            assert (
                "carol"
                == (await bob.request({"type": "request_random_peer"}, "assign_role"))["payload"]["peerId"]
            )


async def test_block_limit(server: InMemoryServer, autojump_clock: MockClock) -> None:
    async with connect(server, "alice") as alice:
        for i in range(MAX_BLOCKS):
            await alice.request({"type": "block_user", "payload": {"user": f"u{i}"}}, "user_blocked")
        assert "limit_reached" == await code_of(
            alice, {"type": "block_user", "payload": {"user": "one-more"}}
        )
        # One already blocked is fine; one unblocked makes room.
        await alice.request({"type": "block_user", "payload": {"user": "u7"}}, "user_blocked")
        await alice.request({"type": "unblock_user", "payload": {"user": "u7"}}, "user_unblocked")
        await alice.request({"type": "block_user", "payload": {"user": "one-more"}}, "user_blocked")


async def test_report_stores_evidence_and_blocks(server: InMemoryServer, autojump_clock: MockClock) -> None:
    async with (
        connect(server, "alice") as alice,
        connect(server, "bob") as bob,
        connect(server, "carol") as carol,
    ):
        await match(alice, bob)
        await bob.send({"type": "chat_message", "toUser": "alice", "payload": {"content": "dm-1"}})
        await alice.expect("chat_message")
        await bob.expect("chat_message")
        for text in ("room-1", "room-2"):
            await bob.send({"type": "chat_message", "room": "Lobby", "payload": {"content": text}})
        await carol.send({"type": "chat_message", "room": "Lobby", "payload": {"content": "carol's"}})
        for _ in range(3):
            for member in (alice, bob, carol):
                await member.expect("chat_message")
        report = {
            "type": "report_user",
            "payload": {"user": "bob", "reason": "harassment", "details": "rude", "matchId": "m-9"},
        }
        got = await alice.request(report, "report_received")
        report_id = got["payload"]["reportId"]
        assert isinstance(report_id, str) and report_id
        # A report blocks: the live match ends, bob can no longer write to alice.
        assert {"reason": "peer_left"} == (await bob.expect("hangup"))["payload"]
        assert {"users": ["bob"]} == (await alice.request({"type": "get_blocked"}, "blocked_users"))[
            "payload"
        ]
        stored = await server.server.store.safety.reports(10)
        assert [report_id] == [r["id"] for r in stored]
        (filed,) = stored
        assert ("alice", "bob", "harassment", "rude") == (
            filed["reporter"],
            filed["reported"],
            filed["reason"],
            filed["details"],
        )
        assert {"matchId": "m-9", "peer": "bob", "current": True} == filed["match"]
        assert server.server.store.instance == filed["instance"]
        assert filed["time"].endswith("Z")
        evidence = filed["evidence"]
        dms = [_json(m)["payload"]["content"] for m in evidence["directMessages"]]
        rooms = [_json(m)["payload"]["content"] for m in evidence["roomMessages"]]
        assert (["dm-1"], ["room-1", "room-2"]) == (dms, rooms)
        assert 1 == server.server.stats.reports["harassment"]


async def test_report_evidence_is_bounded_in_bytes(server: InMemoryServer, autojump_clock: MockClock) -> None:
    """Evidence keeps the newest messages that fit in EVIDENCE_BYTES of each kind: a report
    is kept until ALEATORIA_REPORT_CAP newer ones push it out, and 20 + 20 messages of 32 KB
    made one of 1.3 MB (a red-team run parked 256 MB in Redis in 8 s)."""
    big = "x" * 3000  # about 3 KB each, so twenty are over the bound
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        for i in range(20):
            await bob.send({"type": "chat_message", "toUser": "alice", "payload": {"content": f"{i} {big}"}})
            await bob.send({"type": "chat_message", "room": "Lobby", "payload": {"content": f"{i} {big}"}})
        for _ in range(40):
            await alice.expect("chat_message")
        await alice.request(
            {"type": "report_user", "payload": {"user": "bob", "reason": "spam"}}, "report_received"
        )
        (filed,) = await server.server.store.safety.reports(10)
        for kind in ("directMessages", "roomMessages"):
            kept = filed["evidence"][kind]
            assert sum(len(orjson.dumps(m)) for m in kept) <= EVIDENCE_BYTES
            numbers = [int(_json(m)["payload"]["content"].split()[0]) for m in kept]
            assert numbers == list(range(20 - len(numbers), 20)) and len(numbers) >= 5, (kind, numbers)


async def test_report_reads_its_evidence_within_a_budget(
    autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``report_scenarios.the_evidence_a_report_reads`` on the memory store, the bytes read
    counted as the rooms' messages the evidence is picked from."""
    budget = 64 * 1024
    read = [0]

    def messages_by(user: str, stored: list[bytes], limit: int) -> list[bytes]:
        read[0] += sum(len(message) + 1 for message in stored)
        return picked(user, stored, limit)

    picked = core.messages_by
    monkeypatch.setattr(core, "messages_by", messages_by)

    async def settled(counts: dict[str, int]) -> None:
        pass  # in memory as soon as its sender has its copy

    async with inmemory_server(outbox_bytes=budget) as server:

        def opened(user: str) -> AbstractAsyncContextManager[Peer]:
            return connect(server, user)

        async def reports() -> list[dict[str, Any]]:
            return await server.server.store.safety.reports(50)

        await the_evidence_a_report_reads(opened, reports, lambda: read[0], settled, budget)


async def test_report_records_the_match_between_the_two(
    server: InMemoryServer, autojump_clock: MockClock
) -> None:
    """``report_scenarios.the_match_a_report_records`` on the memory store."""

    def opened(user: str) -> AbstractAsyncContextManager[Peer]:
        return connect(server, user)

    async def reports() -> list[dict[str, Any]]:
        return await server.server.store.safety.reports(50)

    await the_match_a_report_records(opened, reports)


async def test_report_input_errors(server: InMemoryServer, autojump_clock: MockClock) -> None:
    async with connect(server, "alice") as alice:
        bad: list[tuple[Any, str]] = [
            ({"user": "bob", "reason": "boring"}, "invalid_payload"),
            ({"user": "bob"}, "invalid_payload"),
            ({"reason": "spam"}, "invalid_payload"),
            ({"user": "alice", "reason": "spam"}, "invalid_payload"),
            ({"user": "bob", "reason": "spam", "details": "x" * 501}, "too_large"),
            ({"user": "bob", "reason": "spam", "details": 7}, "invalid_payload"),
            ({"user": "bob", "reason": "spam", "matchId": "m" * 129}, "too_large"),
            ("not an object", "invalid_payload"),
        ]
        for payload, code in bad:
            assert code == await code_of(alice, {"type": "report_user", "payload": payload}), payload
        assert [] == await server.server.store.safety.reports(10)
        # Every reason of the six is accepted, details of exactly 500 too.
        for reason in ("spam", "harassment", "nudity", "underage", "hate", "other"):
            payload = {"user": f"r-{reason}", "reason": reason, "details": "d" * 500}
            await alice.request({"type": "report_user", "payload": payload}, "report_received")


async def test_ban_refuses_and_closes_with_4003(server: InMemoryServer, autojump_clock: MockClock) -> None:
    moderation = server.server.moderation
    async with connect(server, "bob") as bob:
        await moderation.ban("bob", duration=60, reason="spam")
        assert (4003, "banned") == (bob.socket.close_code, bob.socket.close_reason)
        stats = server.server.stats
        assert (1, 1, 1) == (stats.bans, stats.kicks, moderation.bans_active)
    with pytest.raises(Closed) as refused:
        async with connect(server, "bob"):
            pass
    assert 403 == refused.value.code
    # Bans end by the wall clock: one that ended lets the user in.
    await moderation.apply(Ban("bob", time.time() - 1, "over", created=time.time() - 61))
    async with connect(server, "bob") as bob:
        await bob.request({"type": "ping"}, "pong")
    await moderation.ban("bob", duration=None)
    assert await moderation.unban("bob")
    async with connect(server, "bob") as bob:
        moderation.kick("bob")
        assert 4003 == bob.socket.close_code
    async with connect(server, "bob") as bob:  # a kick is no ban
        await bob.request({"type": "ping"}, "pong")


async def test_shadow_ban(server: InMemoryServer, autojump_clock: MockClock) -> None:
    """A shadow-banned user sees nothing change, but its room messages and DMs reach only
    itself (and are not stored), and it is matched only with other shadow-banned users."""
    moderation = server.server.moderation
    async with connect(server, "alice") as alice, connect(server, "mallory") as mallory:
        await moderation.ban("mallory", duration=None, shadow=True)
        assert mallory.socket.close_code is None
        await mallory.send({"type": "chat_message", "room": "Lobby", "payload": {"content": "spam"}})
        assert "spam" == (await mallory.expect("chat_message"))["payload"]["content"]
        await mallory.send({"type": "chat_message", "toUser": "alice", "payload": {"content": "psst"}})
        own = await mallory.expect("chat_message")
        assert (False, "psst") == (own["incoming"], own["payload"]["content"])
        await alice.request({"type": "ping"}, "pong")  # nothing arrived before it
        recent = await alice.request(
            {"type": "get_recent_messages", "room": "Lobby", "payload": {}}, "recent_messages"
        )
        assert [] == recent["payload"]["messages"]
        # Matching: mallory only with another shadow-banned user.
        await pooled(alice)
        await mallory.request({"type": "request_random_peer"}, "no_peer_available")
        await alice.send({"type": "user_unavailable_webrtc"})
        await pooled(mallory)
        async with connect(server, "bob") as bob:
            await bob.request({"type": "request_random_peer"}, "no_peer_available")
            async with connect(server, "eve") as eve:
                await moderation.ban("eve", duration=None, shadow=True)
                got = await eve.request({"type": "request_random_peer"}, "assign_role")
                assert "mallory" == got["payload"]["peerId"]
        # Lifted: alice hears mallory again.
        await moderation.unban("mallory")
        await mallory.send({"type": "chat_message", "room": "Lobby", "payload": {"content": "sorry"}})
        assert "sorry" == (await alice.expect("chat_message"))["payload"]["content"]


async def test_shadow_banned_at_connect(server: InMemoryServer, autojump_clock: MockClock) -> None:
    await server.server.moderation.ban("mallory", duration=None, shadow=True)
    async with connect(server, "alice") as alice, connect(server, "mallory") as mallory:
        await mallory.send({"type": "chat_message", "room": "Lobby", "payload": {"content": "spam"}})
        await mallory.expect("chat_message")
        await alice.request({"type": "ping"}, "pong")


async def test_auto_shadow_after_distinct_reports(autojump_clock: MockClock) -> None:
    async with (
        inmemory_server(auto_shadow_reports=2) as server,
        connect(server, "bob") as bob,
        connect(server, "alice") as alice,
    ):
        report = {"type": "report_user", "payload": {"user": "bob", "reason": "spam"}}
        await alice.request(report, "report_received")
        await alice.request(report, "report_received")  # the same reporter counts once
        assert not await server.server.store.safety.bans(0)
        async with connect(server, "carol") as carol:
            await carol.request(report, "report_received")
        (ban,) = await server.server.store.safety.bans(0)
        assert ("bob", True) == (ban.user, ban.shadow)
        assert ban.until is not None and 86399 < ban.until - ban.created <= 86400
        # bob's room messages now reach only bob.
        await bob.send({"type": "chat_message", "room": "Lobby", "payload": {"content": "x"}})
        await bob.expect("chat_message")
        await alice.request({"type": "ping"}, "pong")


async def test_skip_limit(autojump_clock: MockClock) -> None:
    async with inmemory_server(match_rate=2.0, match_burst=3) as server, connect(server, "alice") as alice:
        for _ in range(3):
            await alice.request({"type": "request_random_peer"}, "no_peer_available")
        got = await alice.request({"type": "request_random_peer"}, "error")
        assert "rate_limited" == got["payload"]["code"]
        autojump_clock.jump(0.5)  # one token back
        await alice.request({"type": "request_random_peer"}, "no_peer_available")


async def test_skip_limit_outlives_a_reconnect(autojump_clock: MockClock) -> None:
    """The skip limit is the user's (PROTOCOL.md section 12, "per user"): a new connection,
    replacing the old one or after it closed, goes on with what is left of the burst. It was
    the connection's, so a red-team client reconnected after every 30 skips and skipped as
    fast as it could connect."""
    async with inmemory_server(match_rate=2.0, match_burst=3) as server:
        async with connect(server, "alice") as alice:
            for _ in range(3):
                await alice.request({"type": "request_random_peer"}, "no_peer_available")
            async with connect(server, "alice") as again:  # replaces the first
                got = await again.request({"type": "request_random_peer"}, "error")
                assert "rate_limited" == got["payload"]["code"]
        async with connect(server, "alice") as later:  # after both closed
            got = await later.request({"type": "request_random_peer"}, "error")
            assert "rate_limited" == got["payload"]["code"]
            autojump_clock.jump(0.5)  # one token back
            await later.request({"type": "request_random_peer"}, "no_peer_available")
        async with connect(server, "bob") as bob:  # another user has a budget of its own
            await bob.request({"type": "request_random_peer"}, "no_peer_available")


def _json(data: Any) -> Any:
    return data  # the stored report is plain JSON data


def test_full_skip_budgets_are_forgotten() -> None:
    """The per-user budgets stay bounded: one that is full again is dropped (the supervisor
    sweeps them), one still short of its burst is kept."""
    budgets = {"full": TokenBucket(2.0, 3), "short": TokenBucket(2.0, 3)}
    budgets["full"].take(10.0)
    for _ in range(3):
        budgets["short"].take(11.0)
    forget_full(budgets, 11.0)
    assert ["short"] == list(budgets)
