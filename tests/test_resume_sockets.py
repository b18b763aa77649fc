"""Resume over real sockets (PROTOCOL.md section 15): a level-2 client whose TCP connection
is cut (no close frame) in the middle of a call resumes with its token and hears every frame
it missed once, in order; its peer hears no hangup. /health, /metrics and the logs show the
resume but never a token."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from health import get_json
from rawws import RawWebSocket, http_get, open_raw_ws
from support import RunningServer, connect, running_server

pytestmark = pytest.mark.loopback  # TCP connections cut mid-call


@asynccontextmanager
async def level2(
    server: RunningServer, user: str, resume: str | None = None
) -> AsyncIterator[tuple[RawWebSocket, dict[str, Any]]]:
    """A raw v=2 connection and its welcome."""
    query = "&v=2" + (f"&resume={resume}" if resume else "")
    async with open_raw_ws(server.port, user, joined=False, query=query) as ws:
        welcome = await ws.expect("welcome")
        yield ws, welcome["payload"]


async def wait_kept(server: RunningServer, count: int) -> None:
    """Until /health says ``count`` sessions are kept: the server noticed the drop (it has no
    other outward sign, and the test must not race it)."""
    with trio.fail_after(10):
        while True:
            if count == (await get_json(server.port, "/health"))["keptSessions"]:
                return
            await trio.sleep(0.01)  # /health is the observable; it has no push channel


async def test_tcp_cut_mid_call_then_resume(caplog: pytest.LogCaptureFixture) -> None:
    """Cut mid-call while the peer signals and chats: resumed, every frame once in order, no
    hangup at the peer; /metrics counts it; no token in /health or the logs."""
    caplog.set_level(logging.INFO)
    async with running_server(resume_window=30.0) as server, connect(server, "peer") as peer:
        async with level2(server, "phone") as (phone, welcome):
            token = welcome["resumeToken"]
            await phone.expect("room_joined")
            await peer.send({"type": "user_available_webrtc"})
            await phone.send_json({"type": "request_random_peer"})
            await phone.expect("assign_role")
            await peer.expect("assign_role")
            phone.reset_on_close()  # the network goes: no close frame, an RST
        await wait_kept(server, 1)
        await peer.send({"type": "webrtc_offer", "toUser": "phone", "payload": {"sdp": "o"}})
        await peer.send({"type": "chat_message", "room": "Lobby", "payload": {"content": "r1"}})
        await peer.expect("chat_message")
        await peer.send({"type": "chat_message", "toUser": "phone", "payload": {"content": "d1"}})
        await peer.expect("chat_message")
        async with level2(server, "phone", resume=token) as (back, again):
            assert True is again["resumed"] and 3 == again["missed"]
            assert token != again["resumeToken"]
            got = [await back.recv_json() for _ in range(3)]
            assert ["webrtc_offer", "chat_message", "chat_message"] == [m["type"] for m in got]
            assert ["o", "r1", "d1"] == [
                got[0]["payload"]["sdp"],
                *(m["payload"]["content"] for m in got[1:]),
            ]
            await back.roundtrip()  # nothing else came: no room_joined, nothing twice
            await back.send_json({"type": "webrtc_answer", "toUser": "peer", "payload": {"sdp": "a"}})
            await peer.expect("webrtc_answer")
            await peer.request({"type": "ping"}, "pong")  # and no hangup before it
            health = await get_json(server.port, "/health")
            assert 0 == health["keptSessions"]
            metrics = (await http_get(server.port, "/metrics")).body.decode()
            assert "aleatoria_sessions_resumed_total 1.0" in metrics
            assert "aleatoria_frames_replayed_total 3.0" in metrics
            assert token not in str(health) and token not in metrics
    assert "event=resumed user=phone" in caplog.text
    assert token not in caplog.text and again["resumeToken"] not in caplog.text


async def test_window_passes_then_one_leave() -> None:
    """No resume within the window: one hangup peer_left, and the token is spent."""
    async with running_server(resume_window=0.5) as server, connect(server, "peer") as peer:
        async with level2(server, "phone") as (phone, welcome):
            await phone.expect("room_joined")
            await peer.send({"type": "user_available_webrtc"})
            await phone.send_json({"type": "request_random_peer"})
            await phone.expect("assign_role")
            await peer.expect("assign_role")
        # the phone's socket closed without a close frame (a FIN)
        hangup = await peer.expect("hangup")
        assert {"reason": "peer_left"} == hangup["payload"]
        await peer.request({"type": "ping"}, "pong")
        async with level2(server, "phone", resume=welcome["resumeToken"]) as (_, late):
            assert False is late["resumed"]
        metrics = (await http_get(server.port, "/metrics")).body.decode()
        assert "aleatoria_sessions_expired_total 1.0" in metrics
        assert 'aleatoria_resume_failures_total{reason="expired"} 1.0' in metrics


async def test_bad_level_and_resume_without_level2_are_refused() -> None:
    """v must be 1 or 2; resume needs v=2: 400."""
    async with running_server() as server:
        for target, text in (
            ("/ws?userId=a&v=3", b"Invalid v"),
            ("/ws?userId=a&resume=x", b"resume needs v=2"),
        ):
            response = await http_get(server.port, target)
            assert 400 == response.status, target
            assert response.body.startswith(text), response.body


async def test_kept_sessions_are_capped_per_address() -> None:
    """A kept session holds a connection's state without its socket, so one address keeps
    at most ``max_connections_per_ip`` of them: an address dropping connection after
    connection (a red-team run held 17,500 from one IP in 10 s) gets the rest ended at
    once, as a disconnect -- room members are told -- and counted in /metrics."""
    async with (
        running_server(resume_window=30, max_connections_per_ip=3) as server,
        connect(server, "watcher", "Lobby") as watcher,
    ):
        for n in range(5):
            async with level2(server, f"drop{n}") as (ws, _):
                await ws.expect("room_joined")
                ws.reset_on_close()
            await wait_kept(server, min(n + 1, 3))
        # The two over the cap left Lobby as any disconnect does; the kept three did not.
        members = await watcher.request({"type": "get_room_members", "room": "Lobby"}, "room_members")
        assert ["drop0", "drop1", "drop2", "watcher"] == sorted(members["payload"]["members"])
        metrics = (await http_get(server, "/metrics")).body.decode()
        assert "\naleatoria_sessions_not_kept_total 2.0" in metrics


async def test_an_empty_resume_token_is_a_token_that_names_nothing() -> None:
    """``resume=`` with nothing after it is a token, unknown (PROTOCOL.md section 15):
    ``resumed: false``, a fresh session; without ``resume`` the welcome has no ``resumed``."""
    async with running_server(resume_window=30.0) as server:
        async with open_raw_ws(server.port, "fresh", joined=False, query="&v=2&resume=") as ws:
            welcome = (await ws.expect("welcome"))["payload"]
            assert welcome["resumed"] is False and welcome["resumeToken"]
            await ws.expect("room_joined")
        async with level2(server, "plain") as (ws, welcome):
            assert "resumed" not in welcome
