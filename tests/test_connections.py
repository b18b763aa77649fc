"""Connection-level behaviour: slow consumers, replacement, graceful shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio
from rawws import open_tcp, read_response_head, upgrade_request
from support import RunningServer, close_of, connect, running_server
from trio_websocket import ConnectionClosed

from aleatoria.server import open_listener

pytestmark = pytest.mark.loopback  # real processes, slow TCP readers, accepted sockets' options


async def test_slow_consumer_is_disconnected_with_1013_and_slows_nobody() -> None:
    """A member that stops reading is closed with 1013 once its outbox is full; it gets every
    message up to the close in order, and the other members get everything."""
    total = 4000
    content = "x" * 3000
    async with (
        running_server(outbox_frames=64, close_timeout=30.0) as srv,
        connect(srv, "slow", rcvbuf=4096, message_queue_size=1) as slow,
        connect(srv, "watcher") as watcher,
        connect(srv, "sender") as sender,
    ):
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def send_all() -> None:
                    for i in range(total):
                        await sender.send(
                            {
                                "type": "chat_message",
                                "room": "Lobby",
                                "payload": {"content": f"{i} {content}"},
                            }
                        )

                async def drain_own_echoes() -> None:
                    for _ in range(total):
                        await sender.expect("chat_message")

                nursery.start_soon(send_all)
                nursery.start_soon(drain_own_echoes)
                for i in range(total):
                    message = await watcher.expect("chat_message")
                    assert i == int(message["payload"]["content"].split()[0])
            # Only now does the slow client read: a gapless prefix, then 1013.
            seen = 0
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    message = await slow.recv()
                    if message["type"] == "chat_message":
                        assert seen == int(message["payload"]["content"].split()[0])
                        seen += 1
            assert 1013 == close_of(closed.value)[0]
            assert 0 < seen < total
        await sender.request({"type": "ping"}, "pong")


async def test_second_connection_replaces_the_first(server: RunningServer) -> None:
    """Same userId again: the first gets 4001; rooms and pool place carry over; the new one
    also joins its own URL room."""
    async with connect(server, "bob") as bob, connect(server, "alice") as first:
        await first.request({"type": "join_room", "room": "Games"}, "room_joined")
        await first.send({"type": "user_available_webrtc"})
        await first.request({"type": "ping"}, "pong")
        async with connect(server, "alice", "Music", joined=False) as second:
            assert "Music" == (await second.expect("room_joined"))["room"]
            with pytest.raises(ConnectionClosed) as closed:
                await first.recv()
            assert (4001, "replaced") == close_of(closed.value)
            await bob.request({"type": "join_room", "room": "Games"}, "room_joined")
            await bob.send({"type": "chat_message", "room": "Games", "payload": {"content": "hi"}})
            assert "hi" == (await second.expect("chat_message"))["payload"]["content"]
            await bob.expect("chat_message")
            await bob.send({"type": "request_random_peer"})
            assert "alice" == (await bob.expect("assign_role"))["payload"]["peerId"]
            assert "bob" == (await second.expect("assign_role"))["payload"]["peerId"]


async def test_replacement_keeps_the_match_and_disconnect_ends_it(server: RunningServer) -> None:
    """A live match survives replacement (no peer_left); the successor's disconnect ends it."""
    async with connect(server, "bob") as bob:
        async with connect(server, "alice") as first:
            await first.send({"type": "user_available_webrtc"})
            await first.request({"type": "ping"}, "pong")
            await bob.request({"type": "request_random_peer"}, "assign_role")
            await first.expect("assign_role")
            async with connect(server, "alice") as second:
                await bob.send({"type": "webrtc_offer", "toUser": "alice", "payload": {"sdp": "x"}})
                assert "webrtc_offer" == (await second.expect("webrtc_offer"))["type"]
                reply = await second.request({"type": "request_random_peer"}, "assign_role")
                assert ("polite", "bob") == (reply["payload"]["role"], reply["payload"]["peerId"])
        left = await bob.expect("hangup")
        assert ("alice", "peer_left") == (left["fromUser"], left["payload"]["reason"])


async def _read_port(stream: trio.abc.ReceiveStream, lines: list[str]) -> int:
    buffer = b""
    while True:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise AssertionError("server exited before listening:\n" + "".join(lines))
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            text = line.decode()
            lines.append(text + "\n")
            if "listening on ws://" in text:
                return int(text.split("ws://127.0.0.1:")[1].split("/")[0])


@contextlib.asynccontextmanager
async def _serve_process() -> AsyncIterator[tuple[trio.Process, trio.abc.ReceiveStream, trio.Nursery]]:
    """``aleatoria serve`` as a real process on a free port, with its piped stderr; killed if
    the test leaves it running."""
    env = {**os.environ, "ALEATORIA_PORT": "0", "PYTHONUNBUFFERED": "1"}
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-m", "aleatoria", "serve", "--rate-limit", "0"],
                stderr=subprocess.PIPE,
                env=env,
                check=False,
            )
        )
        assert process.stderr is not None
        try:
            yield process, process.stderr, nursery
        finally:
            if process.returncode is None:
                process.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_graceful_shutdown_of_a_real_process(signum: int) -> None:
    """SIGTERM/SIGINT: every client is closed with 1001 and the process exits 0 within 10 s."""
    lines: list[str] = []
    async with _serve_process() as (process, stderr, nursery):
        with trio.fail_after(20):
            port = await _read_port(stderr, lines)
            srv = RunningServer(port, None, nursery.cancel_scope)  # type: ignore[arg-type]
            async with connect(srv, "alice") as alice, connect(srv, "bob") as bob:
                await alice.send({"type": "chat_message", "room": "Lobby", "payload": {"content": "x"}})
                await bob.expect("chat_message")
                started = trio.current_time()
                process.send_signal(signum)
                for peer in (alice, bob):
                    with pytest.raises(ConnectionClosed) as closed:
                        while True:
                            await peer.recv()
                    assert 1001 == close_of(closed.value)[0]
            while (chunk := await stderr.receive_some(4096)) != b"":
                lines.append(chunk.decode())
            await process.wait()
            assert 0 == process.returncode, "".join(lines)
            assert trio.current_time() - started < 10
            assert any("shutdown_done" in line for line in lines)


@pytest.mark.parametrize("when", ["shutdown_started", "shutdown_done"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_second_signal_still_exits_0(signum: int, when: str) -> None:
    """A second SIGTERM/SIGINT during the drain (``shutdown_started`` logged) or once it is over
    (``shutdown_done``, the process on its way out), repeated until it exits, does not kill it: it exits 0. It
    exited -15 (or -2 after a KeyboardInterrupt): leaving the signal receiver put the default
    handlers back and re-raised a signal the receiver still held."""
    lines: list[str] = []
    async with _serve_process() as (process, stderr, _):
        with trio.fail_after(20):
            await _read_port(stderr, lines)
            process.send_signal(signum)
            while not any(when in line for line in lines):
                chunk = await stderr.receive_some(4096)
                assert chunk, "".join(lines)
                lines.append(chunk.decode())
            # Again and again until it exits: also while the interpreter finalizes.
            while process.returncode is None:
                process.send_signal(signum)
                with trio.move_on_after(0.002):
                    await process.wait()
            while (chunk := await stderr.receive_some(4096)) != b"":
                lines.append(chunk.decode())
        assert 0 == process.returncode, "".join(lines)
        assert "Traceback" not in "".join(lines)


async def test_shutdown_does_not_wait_out_a_socket_that_sent_nothing() -> None:
    """A socket that never sent its request head (a browser's preconnect, a probe) is closed
    when the server shuts down, not waited for until its handshake timeout (it once held a
    shutdown for 9 s of a 10 s timeout, with nothing in the log)."""
    async with running_server(handshake_timeout=30.0, shutdown_timeout=20.0) as srv:
        idle = await trio.open_tcp_stream("127.0.0.1", srv.port)
        # Accepted in order: once /health answers, the idle socket is being read too.
        stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
        async with stream:
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while await stream.receive_some(4096):
                pass
        srv.scope.cancel()
        started = trio.current_time()
    assert trio.current_time() - started < 5
    async with idle:
        assert b"" == await idle.receive_some(10)  # closed, nothing said


async def test_behind_a_proxy_the_cap_counts_the_address_the_proxy_appended() -> None:
    """With ``client_ip_header`` X-Forwarded-For, the per-address cap counts the entry the
    proxy appended (the last), not what the client put in front of it: a client rotating
    its own entries once got 10 sessions past a cap of 3."""
    async with (
        running_server(client_ip_header="X-Forwarded-For", max_connections_per_ip=2) as srv,
        contextlib.AsyncExitStack() as held,
    ):
        statuses = []
        for n in range(3):
            conn = await held.enter_async_context(open_tcp(srv))
            headers = {"X-Forwarded-For": f"203.0.113.{n}, 10.9.9.9"}
            await conn.send(upgrade_request(srv.port, f"/ws?userId=p{n}", headers=headers))
            statuses.append((await read_response_head(conn)).status)
            if statuses[-1] == 101:
                with trio.fail_after(10):
                    await conn.read_until(b"room_joined")  # the session is counted by now
        assert [101, 101, 503] == statuses


async def test_health_reports_connections(server: RunningServer) -> None:
    """/health counts live connections and says the store is in-memory."""
    async with connect(server, "alice"):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := await stream.receive_some(4096):
                data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200")
        health = json.loads(body)
        assert ("ok", "disabled", 1) == (health["status"], health["redis"], health["connections"])


def test_accepted_sockets_send_small_frames_at_once() -> None:
    """TCP_NODELAY is set once on the listener and inherited by every accepted socket: a
    reply must never wait for Nagle's algorithm (an ACK from the client)."""
    listener = open_listener("127.0.0.1", 0)
    with listener, socket.create_connection(listener.getsockname()[:2]):
        listener.setblocking(True)
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
