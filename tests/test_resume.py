"""Resume after a dropped connection on one instance (PROTOCOL.md section 15), on the
in-memory tier with trio's mock clock: a kept session's rooms, pool place and match stay,
the frames for it are replayed once and in order, the window's end is one leave, tokens are
single-use and bound to their user, an overflowing outbox is never half-replayed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from inmemory import Closed, InMemoryServer, connect, inmemory_server
from inmemory import FakePeer as Peer
from trio.testing import MockClock

from aleatoria.resume import EXPIRED, OTHER_USER, OVERFLOW, UNKNOWN


@pytest.fixture
async def server() -> AsyncIterator[InMemoryServer]:
    async with inmemory_server(resume_window=30.0) as running:
        yield running


async def quiet(peer: Peer) -> None:
    """Nothing is waiting for ``peer``."""
    await peer.request({"type": "ping"}, "pong")


async def until(peer: Peer, kind: str) -> dict[str, Any]:
    """The next frame of type ``kind``, past presence events (member_joined/member_left)."""
    while True:
        message = await peer.recv()
        if message["type"] == kind:
            return message
        assert message["type"] in ("member_joined", "member_left"), message


async def matched(a: Peer, b: Peer) -> None:
    await b.send({"type": "user_available_webrtc"})
    await a.send({"type": "request_random_peer"})
    await until(a, "assign_role")
    await until(b, "assign_role")


def chat(room: str, content: str) -> dict[str, Any]:
    return {"type": "chat_message", "room": room, "payload": {"content": content}}


async def test_resume_replays_what_was_missed_in_order(
    server: InMemoryServer, autojump_clock: MockClock
) -> None:
    """Dropped mid-call while the peer signals and the room chats: the resumed session hears
    welcome {resumed, missed}, then exactly those frames in order, then live traffic; the
    peer never heard a hangup and the room no member_left."""
    async with connect(server, "phone", v=2) as phone, connect(server, "peer", v=2) as peer:
        await phone.expect("member_joined")
        await matched(phone, peer)
        await phone.drop()
        assert 1 == len(server.server.resumes.kept)
        sent = []
        await peer.send({"type": "webrtc_offer", "toUser": "phone", "payload": {"sdp": "x"}})
        sent.append(("webrtc_offer", "x"))
        for i in range(3):
            await peer.send(chat("Lobby", f"m{i}"))
            await peer.expect("chat_message")
            sent.append(("chat_message", f"m{i}"))
        await peer.send({"type": "chat_message", "toUser": "phone", "payload": {"content": "dm"}})
        await peer.expect("chat_message")
        sent.append(("chat_message", "dm"))
        await trio.sleep(29.0)
        async with connect(server, "phone", v=2, resume=phone.token) as back:
            assert back.welcome is not None
            assert {"resumed": True, "missed": 5} == {
                k: back.welcome["payload"][k] for k in ("resumed", "missed")
            }
            assert back.token != phone.token
            got = []
            for _ in sent:
                message = await back.recv()
                got.append((message["type"], message["payload"].get("sdp") or message["payload"]["content"]))
            assert sent == got
            await quiet(back)
            # live again: the match and the room carry on
            await peer.send({"type": "webrtc_candidate", "toUser": "phone", "payload": {"candidate": "c"}})
            assert {"candidate": "c"} == (await back.expect("webrtc_candidate"))["payload"]
            await back.send({"type": "webrtc_answer", "toUser": "peer", "payload": {"sdp": "y"}})
            await peer.expect("webrtc_answer")
            rooms = await back.request({"type": "get_rooms"}, "rooms_list")
            assert ["Lobby"] == rooms["payload"]["rooms"]
            await quiet(peer)  # no hangup, no member_left
            assert 0 == len(server.server.resumes.kept)
            assert 1 == server.server.resumes.resumed and 5 == server.server.resumes.replayed


async def test_window_passes_one_leave(server: InMemoryServer, autojump_clock: MockClock) -> None:
    """No resume within the window: exactly one member_left, one hangup peer_left, the pool
    place gone -- and the token resumes nothing afterwards."""
    async with (
        connect(server, "phone", v=2) as phone,
        connect(server, "peer", v=2) as peer,
        connect(server, "pooled", "Other", v=2) as pooled,
    ):
        await phone.expect("member_joined")
        await matched(phone, peer)
        await pooled.send({"type": "user_available_webrtc"})
        await pooled.drop()
        await phone.drop()
        await trio.sleep(29.9)
        await quiet(peer)
        stats = await peer.request({"type": "get_stats"}, "stats")
        assert {"online": 3, "searching": 1, "inCalls": 2} == {
            k: stats["payload"][k] for k in ("online", "searching", "inCalls")
        }
        await trio.sleep(0.2)
        assert {"room": "Lobby", "user": "phone"} == (await peer.expect("member_left"))["payload"]
        hangup = await peer.expect("hangup")
        assert {"reason": "peer_left"} == hangup["payload"] and "phone" == hangup["fromUser"]
        await quiet(peer)
        stats = await peer.request({"type": "get_stats"}, "stats")
        assert {"online": 1, "searching": 0, "inCalls": 0} == {
            k: stats["payload"][k] for k in ("online", "searching", "inCalls")
        }
        assert 2 == server.server.resumes.expired
        async with connect(server, "phone", v=2, resume=phone.token) as late:
            assert late.welcome is not None and late.welcome["payload"]["resumed"] is False
            assert {"missed"}.isdisjoint(late.welcome["payload"])
        assert 1 == server.server.resumes.failures[EXPIRED]


async def test_tokens_are_single_use_and_bound_to_their_user(
    server: InMemoryServer, autojump_clock: MockClock
) -> None:
    """A used token, another user's token or a made-up one: a fresh session (resumed false),
    and the kept session it named is untouched by the foreign attempt."""
    async with connect(server, "a", v=2) as a, connect(server, "b", v=2) as b:
        await a.expect("member_joined")
        await a.drop()
        async with connect(server, "b2", v=2, resume=a.token) as thief:
            assert thief.welcome is not None and thief.welcome["payload"]["resumed"] is False
        assert 1 == len(server.server.resumes.kept)
        async with connect(server, "a", v=2, resume="not-a-token") as guess:
            assert guess.welcome is not None and guess.welcome["payload"]["resumed"] is False
        # that fresh connection of a ended the kept session: its leave happened first
        assert 0 == len(server.server.resumes.kept)
        assert {OTHER_USER: 1, UNKNOWN: 1} == dict(server.server.resumes.failures)
        events = [(m["type"], m["payload"]["user"]) for m in [await b.recv() for _ in range(5)]]
        assert [
            ("member_joined", "b2"),
            ("member_left", "b2"),
            ("member_left", "a"),
            ("member_joined", "a"),
            ("member_left", "a"),
        ] == events
        await quiet(b)


async def test_resume_twice_with_one_token(server: InMemoryServer, autojump_clock: MockClock) -> None:
    """A token resumes once; the second attempt gets a fresh session."""
    async with connect(server, "a", v=2) as a:
        await a.drop()
        async with connect(server, "a", v=2, resume=a.token) as first:
            assert first.welcome is not None and first.welcome["payload"]["resumed"] is True
            await first.drop()
            async with connect(server, "a", v=2, resume=a.token) as second:
                assert second.welcome is not None and second.welcome["payload"]["resumed"] is False
                await quiet(second)


async def test_a_used_token_while_its_session_is_live_here_is_a_fresh_session(
    server: InMemoryServer, autojump_clock: MockClock
) -> None:
    """Two resumes with one token at the same moment on one instance: the second, refused,
    replaces the first's live session, and that session leaves (its peer hears hangup
    peer_left, its room member_left): the fresh session carries none of its rooms or match,
    as when the session lives on another instance (it gave a "fresh" session still in the
    call, the peer never told). A made-up token against a live session: the same."""
    async with connect(server, "phone", "Games", v=2) as phone, connect(server, "peer", "Games", v=2) as peer:
        await until(phone, "member_joined")
        await matched(phone, peer)
        await phone.drop()
        async with connect(server, "phone", v=2, resume=phone.token) as first:
            assert first.welcome is not None and first.welcome["payload"]["resumed"] is True
            async with connect(server, "phone", v=2, resume=phone.token) as second:
                assert second.welcome is not None and second.welcome["payload"]["resumed"] is False
                assert "peer_left" == (await until(peer, "hangup"))["payload"]["reason"]
                rooms = await second.request({"type": "get_rooms"}, "rooms_list")
                assert ["Lobby"] == rooms["payload"]["rooms"]
                left = await peer.request({"type": "get_room_members", "room": "Games"}, "room_members")
                assert ["peer"] == left["payload"]["members"]
                await quiet(peer)
    async with connect(server, "a", "Games", v=2) as a, connect(server, "b", "Games", v=2) as b:
        await matched(a, b)
        async with connect(server, "a", v=2, resume="made-up") as fresh:
            assert fresh.welcome is not None and fresh.welcome["payload"]["resumed"] is False
            assert "peer_left" == (await until(b, "hangup"))["payload"]["reason"]
            assert ["Lobby"] == (await fresh.request({"type": "get_rooms"}, "rooms_list"))["payload"]["rooms"]


async def test_too_many_frames_end_the_session(autojump_clock: MockClock) -> None:
    """More frames than ALEATORIA_OUTBOX_FRAMES for a kept session: it ends at once (the
    peer hears hangup peer_left) and a resume gets resumed false, nothing half-replayed."""
    async with (
        inmemory_server(resume_window=30.0, outbox_frames=5) as server,
        connect(server, "phone", v=2) as phone,
        connect(server, "peer") as peer,
    ):
        await matched(phone, peer)
        await phone.drop()
        for i in range(5):
            await peer.send({"type": "webrtc_candidate", "toUser": "phone", "payload": {"candidate": str(i)}})
        assert 1 == len(server.server.resumes.kept)
        await peer.send({"type": "webrtc_candidate", "toUser": "phone", "payload": {"candidate": "6"}})
        hangup = await peer.expect("hangup")
        assert "peer_left" == hangup["payload"]["reason"]
        async with connect(server, "phone", v=2, resume=phone.token) as back:
            assert back.welcome is not None and back.welcome["payload"]["resumed"] is False
            await quiet(back)
        assert {OVERFLOW: 1} == dict(server.server.resumes.failures)


async def test_too_many_bytes_end_the_session(autojump_clock: MockClock) -> None:
    """A kept session's frames are bounded in bytes as a live outbox's are
    (ALEATORIA_OUTBOX_BYTES behind the first frame): past it the session ends at once (the
    peer hears hangup peer_left) and a resume gets resumed false. It kept 256 relayed 64 KiB
    offers, 16 MB, where a live outbox holds 1 MiB."""
    offer = "x" * 20_000
    async with (
        inmemory_server(resume_window=30.0, outbox_bytes=65_536) as server,
        connect(server, "phone", v=2) as phone,
        connect(server, "peer") as peer,
    ):
        await matched(phone, peer)
        await phone.drop()
        for _ in range(4):  # the first, then three behind it: 60 KB
            await peer.send({"type": "webrtc_offer", "toUser": "phone", "payload": {"sdp": offer}})
        assert 1 == len(server.server.resumes.kept)
        await peer.send({"type": "webrtc_offer", "toUser": "phone", "payload": {"sdp": offer}})
        hangup = await peer.expect("hangup")
        assert "peer_left" == hangup["payload"]["reason"]
        async with connect(server, "phone", v=2, resume=phone.token) as back:
            assert back.welcome is not None and back.welcome["payload"]["resumed"] is False
            await quiet(back)
        assert {OVERFLOW: 1} == dict(server.server.resumes.failures)


async def test_clean_close_ends_at_once(server: InMemoryServer, autojump_clock: MockClock) -> None:
    """A client close frame (1000) ends the session at once: nothing is kept; 1001 keeps it."""
    async with connect(server, "a", v=2) as a, connect(server, "watcher", v=2) as watcher:
        await a.drop(1000)
        assert {"room": "Lobby", "user": "a"} == (await watcher.expect("member_left"))["payload"]
        assert 0 == len(server.server.resumes.kept)
    async with connect(server, "b", v=2) as b:
        await b.drop(1001)
        assert 1 == len(server.server.resumes.kept)


async def test_level1_is_never_kept(server: InMemoryServer, autojump_clock: MockClock) -> None:
    """A level-1 connection that drops leaves at once, as before."""
    async with connect(server, "old") as old, connect(server, "peer") as peer:
        await matched(old, peer)
        await old.drop()
        assert "peer_left" == (await peer.expect("hangup"))["payload"]["reason"]
        assert 0 == len(server.server.resumes.kept)


async def test_resume_before_the_drop_is_noticed(server: InMemoryServer, autojump_clock: MockClock) -> None:
    """The phone reconnects with its token while the server still thinks the old connection
    is up: the new one takes the session over (the old one is closed 4001), resumed."""
    async with connect(server, "phone", "Games", v=2) as phone, connect(server, "peer", v=2) as peer:
        await matched(phone, peer)
        async with connect(server, "phone", v=2, resume=phone.token) as back:
            assert back.welcome is not None
            assert {"resumed": True, "missed": 0} == {
                k: back.welcome["payload"][k] for k in ("resumed", "missed")
            }
            with pytest.raises(Closed) as closed:
                await phone.recv()
            assert 4001 == closed.value.code
            await peer.send({"type": "webrtc_offer", "toUser": "phone", "payload": {"sdp": "x"}})
            await until(back, "webrtc_offer")
            assert ["Games"] == (await back.request({"type": "get_rooms"}, "rooms_list"))["payload"]["rooms"]
            await quiet(peer)


async def test_shutdown_ends_kept_sessions(autojump_clock: MockClock) -> None:
    """Closing the server's connections ends the kept sessions too (their leave happens)."""
    async with (
        inmemory_server(resume_window=30.0) as server,
        connect(server, "a", v=2) as a,
        connect(server, "b") as b,
    ):
        await matched(a, b)
        await a.drop()
        with trio.fail_after(5):
            server.server.hub.close_all(1001, "server shutting down")
            await server.server.resumes.all_ended.wait()
        assert 0 == len(server.server.resumes.kept)
        assert server.server.store.match_peer("b") is None  # a's leave ended the match
