"""Resume on another instance (PROTOCOL.md sections 9 and 15): two real ``aleatoria serve``
processes sharing a real redis-server. A level-2 client's TCP connection is cut in the
middle of a call while its peer and a room keep sending; it resumes on the other instance
and hears every frame once (room messages in order), and its peer hears no hangup. A
replayed, foreign or expired token and an overflowing session get a fresh session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from health import get_json
from rawws import CLOSE, TEXT, RawWebSocket, close_frame, open_raw_ws
from redis_server import RedisServer
from scaleout_support import FAST_PRESENCE, ServerProcess, serve_process
from support import SocketPeer, connect

FAST = [
    "--presence-ttl",
    str(FAST_PRESENCE["presence_ttl"]),
    "--heartbeat-interval",
    str(FAST_PRESENCE["heartbeat_interval"]),
]


@asynccontextmanager
async def level2(
    port: int, user: str, resume: str | None = None, room: str | None = None
) -> AsyncIterator[tuple[RawWebSocket, dict[str, Any]]]:
    """A raw v=2 connection to ``port`` and its welcome's payload."""
    query = "&v=2" + (f"&resume={resume}" if resume else "")
    async with open_raw_ws(port, user, room, joined=False, query=query) as ws:
        welcome = await ws.expect("welcome")
        yield ws, welcome["payload"]


async def wait_kept(server: ServerProcess, count: int) -> None:
    """Until the instance's /health shows ``count`` kept sessions (it noticed the cut)."""
    with trio.fail_after(10):
        while True:
            if count == (await get_json(server.port, "/health"))["keptSessions"]:
                return
            await trio.sleep(0.01)  # /health is the observable; it has no push channel


async def until_pong(client: SocketPeer) -> list[dict[str, Any]]:
    """Everything ``client`` receives up to the answer to a ping (a round trip)."""
    await client.send({"type": "ping"})
    got = []
    while (message := await client.recv())["type"] != "pong":
        got.append(message)
    return got


async def call(phone: RawWebSocket, peer: SocketPeer) -> None:
    """Match ``phone`` (which requests) with ``peer`` (pooled)."""
    await peer.send({"type": "user_available_webrtc"})
    await peer.sync()
    await phone.send_json({"type": "request_random_peer"})
    while (await phone.recv_json())["type"] != "assign_role":
        pass
    await peer.expect("assign_role", skip=True)


async def test_cut_mid_call_resumes_on_the_other_instance(redis_server: RedisServer) -> None:
    """Every frame sent to the dropped client arrives once after the resume on the other
    instance, room messages in their order; the peer never hears a hangup; live traffic
    follows on the new instance."""
    url = redis_server.url
    async with (
        serve_process("--redis-url", url, "--resume-window", "30", *FAST) as one,
        serve_process("--redis-url", url, "--resume-window", "30", *FAST) as two,
        connect(one.port, "peer", skip=True) as peer,
        connect(two.port, "roomie", skip=True) as roomie,
    ):
        async with level2(one.port, "phone") as (phone, welcome):
            await phone.expect("room_joined")
            await call(phone, peer)
            phone.reset_on_close()  # the network goes: no close frame
        await wait_kept(one, 1)
        await peer.send({"type": "webrtc_offer", "toUser": "phone", "payload": {"sdp": "o"}})
        for i in range(3):
            await roomie.send({"type": "chat_message", "room": "Lobby", "payload": {"content": f"r{i}"}})
            await roomie.expect("chat_message", skip=True)
        await peer.send({"type": "chat_message", "toUser": "phone", "payload": {"content": "d"}})
        await peer.expect("chat_message", skip=True)
        async with level2(two.port, "phone", resume=welcome["resumeToken"]) as (back, again):
            assert True is again["resumed"], again
            got = [await back.recv_json() for _ in range(again["missed"])]
            await back.roundtrip()  # nothing more: no duplicate, no room_joined
            seen = [(m["type"], (m["payload"].get("sdp") or m["payload"].get("content"))) for m in got]
            assert sorted(
                [
                    ("webrtc_offer", "o"),
                    ("chat_message", "r0"),
                    ("chat_message", "r1"),
                    ("chat_message", "r2"),
                    ("chat_message", "d"),
                ]
            ) == sorted(seen)
            rooms = [content for kind, content in seen if content and content.startswith("r")]
            assert ["r0", "r1", "r2"] == rooms
            # live on the new instance: signaling both ways, the room
            await peer.send({"type": "webrtc_candidate", "toUser": "phone", "payload": {"candidate": "c"}})
            assert {"candidate": "c"} == (await back.expect("webrtc_candidate"))["payload"]
            await back.send_json({"type": "webrtc_answer", "toUser": "peer", "payload": {"sdp": "a"}})
            await peer.expect("webrtc_answer", skip=True)
            await roomie.send({"type": "chat_message", "room": "Lobby", "payload": {"content": "live"}})
            assert "live" == (await back.expect("chat_message"))["payload"]["content"]
            await back.roundtrip()
            assert [] == [m for m in await until_pong(peer) if m["type"] == "hangup"]
            assert 0 == (await get_json(one.port, "/health"))["keptSessions"]
    assert welcome["resumeToken"] not in one.text() + two.text()


async def test_bad_tokens_and_overflow_across_instances(redis_server: RedisServer) -> None:
    """Another user's token, a used token, an expired window and an overflowed session all
    get resumed false on the other instance; the genuine owner still resumes once."""
    url = redis_server.url
    async with (
        serve_process("--redis-url", url, "--resume-window", "30", "--outbox-frames", "8", *FAST) as one,
        serve_process("--redis-url", url, "--resume-window", "30", "--outbox-frames", "8", *FAST) as two,
        connect(two.port, "roomie", skip=True) as roomie,
    ):
        async with level2(one.port, "phone") as (phone, welcome):
            await phone.expect("room_joined")
            phone.reset_on_close()
        await wait_kept(one, 1)
        token = welcome["resumeToken"]
        async with level2(two.port, "thief", resume=token) as (_, stolen):
            assert False is stolen["resumed"]
        await wait_kept(two, 1)
        async with level2(two.port, "phone", resume=token) as (back, again):
            assert True is again["resumed"]
            back.reset_on_close()
        await wait_kept(two, 2)  # the thief's session too: it dropped
        async with level2(one.port, "phone", resume=token) as (_, replayed):  # used already
            assert False is replayed["resumed"]
        # overflow: more room messages than the kept session may hold
        async with level2(one.port, "phone") as (phone, fresh):
            await phone.expect("room_joined")
            phone.reset_on_close()
        await wait_kept(one, 1)
        for i in range(9):
            await roomie.send({"type": "chat_message", "room": "Lobby", "payload": {"content": str(i)}})
            await roomie.expect("chat_message", skip=True)
        await wait_kept(one, 0)  # it ended at once
        async with level2(two.port, "phone", resume=fresh["resumeToken"]) as (_, over):
            assert False is over["resumed"]
    for server in (one, two):
        assert "event=resume_failed" in server.text() or "resume_handed_over" in server.text()


async def test_window_passes_one_leave_across_instances(redis_server: RedisServer) -> None:
    """The window passes on the owner: one member_left to a level-2 member on the other
    instance, one hangup peer_left, the pool place gone; the token is then no use there."""
    url = redis_server.url
    async with (
        serve_process("--redis-url", url, "--resume-window", "1", *FAST) as one,
        serve_process("--redis-url", url, "--resume-window", "1", *FAST) as two,
        connect(two.port, "peer", skip=True) as peer,
        level2(two.port, "watcher") as (watcher, _),
    ):
        await watcher.expect("room_joined")
        async with level2(one.port, "phone") as (phone, welcome):
            await phone.expect("room_joined")
            assert {"room": "Lobby", "user": "phone"} == (await watcher.expect("member_joined"))["payload"]
            await call(phone, peer)
            phone.reset_on_close()
        hangup = await peer.expect("hangup", skip=True)
        assert {"reason": "peer_left"} == hangup["payload"]
        assert {"room": "Lobby", "user": "phone"} == (await watcher.expect("member_left"))["payload"]
        await watcher.roundtrip()  # exactly one
        assert [] == [m for m in await until_pong(peer) if m["type"] == "hangup"]
        stats = await peer.request({"type": "get_stats"}, "stats", skip=True)
        assert 0 == stats["payload"]["searching"] and 0 == stats["payload"]["inCalls"]
        async with level2(two.port, "phone", resume=welcome["resumeToken"]) as (_, late):
            assert False is late["resumed"]


async def test_a_used_token_ends_the_session_it_named_on_the_other_instance(
    redis_server: RedisServer,
) -> None:
    """A phone resumes on instance two, drops again, and comes back to instance one with the
    token it already used: a fresh session (resumed false), and the session kept on two
    leaves as in section 5 -- its peer hears hangup peer_left and the phone is in no call
    (it found itself back in the old one, told "fresh", and matched with it again)."""
    url = redis_server.url
    async with (
        serve_process("--redis-url", url, "--resume-window", "30", *FAST) as one,
        serve_process("--redis-url", url, "--resume-window", "30", *FAST) as two,
        connect(two.port, "peer", skip=True) as peer,
    ):
        async with level2(one.port, "phone") as (phone, welcome):
            await phone.expect("room_joined")
            await call(phone, peer)
            phone.reset_on_close()
        await wait_kept(one, 1)
        token = welcome["resumeToken"]
        async with level2(two.port, "phone", resume=token) as (back, again):
            assert True is again["resumed"], again
            back.reset_on_close()
        await wait_kept(two, 1)
        async with level2(one.port, "phone", resume=token) as (fresh, used):
            assert False is used["resumed"], used
            hangup = await peer.expect("hangup", skip=True)
            assert ("phone", {"reason": "peer_left"}) == (hangup["fromUser"], hangup["payload"])
            await fresh.send_json({"type": "request_random_peer"})
            while (reply := await fresh.recv_json())["type"] not in ("assign_role", "no_peer_available"):
                pass
            assert "no_peer_available" == reply["type"], reply
        await wait_kept(two, 0)


async def test_a_wrong_token_against_a_live_session_on_the_same_instance_is_a_fresh_session(
    redis_server: RedisServer,
) -> None:
    """A phone in a call reconnects to its own instance with a token that names nothing: the
    instance asks no other (the session is its own), and the session it replaces leaves --
    its peer hears hangup peer_left and the fresh session is in no room but its URL's (it
    carried the session over, still in the call, told "fresh")."""
    async with (
        serve_process("--redis-url", redis_server.url, "--resume-window", "30", *FAST) as one,
        connect(one.port, "peer", skip=True) as peer,
        level2(one.port, "phone", room="Games") as (phone, _),
    ):
        await phone.expect("room_joined")
        await call(phone, peer)
        async with level2(one.port, "phone", resume="made-up") as (fresh, welcome):
            assert False is welcome["resumed"], welcome
            hangup = await peer.expect("hangup", skip=True)
            assert ("phone", {"reason": "peer_left"}) == (hangup["fromUser"], hangup["payload"])
            await fresh.send_json({"type": "get_rooms"})
            while (reply := await fresh.recv_json())["type"] != "rooms_list":
                pass
            assert ["Lobby"] == reply["payload"]["rooms"]


async def offer_or_close(ws: RawWebSocket, ready: trio.Event) -> str:
    """Read ``ws`` until the peer's ``webrtc_offer`` ("offer") or a close frame ("closed");
    ``ready`` is set at the ``pong``: the session is set up."""
    while True:
        got = await ws.read_frame()
        if got.opcode == CLOSE:
            return "closed"
        if got.opcode == TEXT:
            kind = got.json()["type"]
            if kind == "pong":
                ready.set()
            elif kind == "webrtc_offer":
                return "offer"


async def come_back_twice(one: int, two: int, peer: SocketPeer, user: str, token: str) -> dict[str, str]:
    """``user`` connects to ``one`` afresh and resumes with ``token`` on ``two`` at once; once
    one of the two is closed, ``peer`` sends an offer to ``user``. Returns what each heard:
    "offer" or "closed"."""
    settled = trio.Event()
    ready = {"resume": trio.Event(), "fresh": trio.Event()}
    outcomes: dict[str, str] = {}

    async def come_back(name: str, port: int, resume: str | None) -> None:
        async with level2(port, user, resume=resume) as (ws, _):
            await ws.send_json({"type": "ping"})
            outcomes[name] = await offer_or_close(ws, ready[name])
            if outcomes[name] == "closed":
                settled.set()
            else:  # a clean close: nothing kept
                await ws.send_frame(close_frame(1000))
                await ws.expect_close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(come_back, "resume", two, token)
        nursery.start_soon(come_back, "fresh", one, None)
        with trio.fail_after(10):
            await settled.wait()
            await ready["fresh" if "resume" in outcomes else "resume"].wait()
        await peer.send({"type": "webrtc_offer", "toUser": user, "payload": {"sdp": "o"}})
    return outcomes


async def test_a_resume_racing_a_fresh_connect_on_the_other_instance_leaves_one_session(
    redis_server: RedisServer,
) -> None:
    """A kept session's user comes back twice at once: with its token on instance two, and
    without one on instance one, which ends the kept session, so the resume fails and the
    session it adopted leaves. Once one of the two connections is closed as replaced, the
    other is live and hears the peer's offer. The failed resume's session registered itself
    again after the fresh connect had taken the user over: the user's presence then named the
    closed connection, and offers went nowhere (or both connections were closed as replaced)."""
    url = redis_server.url
    async with (
        serve_process("--redis-url", url, "--resume-window", "30", *FAST) as one,
        serve_process("--redis-url", url, "--resume-window", "30", *FAST) as two,
        connect(two.port, "peer", skip=True) as peer,
    ):
        for n in range(40):
            user = f"phone{n}"
            async with level2(one.port, user, room="Calls") as (phone, welcome):
                await phone.expect("room_joined")
                phone.reset_on_close()
            await wait_kept(one, 1)
            outcomes = await come_back_twice(one.port, two.port, peer, user, welcome["resumeToken"])
            assert ["closed", "offer"] == sorted(outcomes.values()), (n, outcomes)


async def test_a_token_with_a_non_ascii_character_is_refused_on_the_owner_too(
    redis_server: RedisServer,
) -> None:
    """A phone kept on instance one is resumed on instance two with a token holding an "é":
    two asks one, which refuses it (resumed false) and goes on delivering across instances.
    The owner compared it as a str, which hmac.compare_digest refuses with a TypeError: the
    bus's dispatch failed, the bus reconnected (what it was delivering lost), and two waited
    for an answer that never came."""
    url = redis_server.url
    async with (
        serve_process("--redis-url", url, "--resume-window", "30", *FAST) as one,
        serve_process("--redis-url", url, "--resume-window", "30", *FAST) as two,
        connect(one.port, "listener", skip=True) as listener,
    ):
        async with level2(one.port, "phone") as (phone, welcome):
            await phone.expect("room_joined")
            phone.reset_on_close()
        await wait_kept(one, 1)
        with trio.fail_after(2):  # well within the owner's answer timeout
            async with level2(two.port, "phone", resume="%C3%A9" + welcome["resumeToken"][1:]) as (_, again):
                assert False is again["resumed"], again
        async with connect(two.port, "sender", skip=True) as sender:
            await sender.send({"type": "chat_message", "toUser": "listener", "payload": {"content": "x"}})
            assert "x" == (await listener.expect("chat_message", skip=True))["payload"]["content"]
    assert "bus_error" not in one.text()
