"""The flusher: what connections are sent during one scheduler pass is written after it (or
once ``MAX_PENDING`` connections wait), one system call per connection, in order, and ahead
of any close frame."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from aleatoria import messages as m
from aleatoria.connection import WebSocket
from aleatoria.flusher import MAX_PENDING, Flusher, open_flusher
from aleatoria.frames import text_frame
from aleatoria.hub import Client, open_hub
from aleatoria.limits import RateLimiter

CLOSE_1000 = b"\x88\x02\x03\xe8"  # an unmasked server close frame, code 1000, no reason
CLIENT_CLOSE_1000 = b"\x88\x82" + b"\x00\x00\x00\x00" + b"\x03\xe8"  # masked with a zero key


class _CountingSocket(socket.socket):
    """A real socket that counts its ``send`` calls."""

    sends = 0

    def send(self, data: bytes | memoryview, flags: int = 0) -> int:  # type: ignore[override]
        self.sends += 1
        return super().send(data, flags)


@pytest.fixture
async def flusher() -> AsyncIterator[Flusher]:
    async with open_flusher() as running:
        yield running


def _pair() -> tuple[_CountingSocket, socket.socket]:
    a, b = socket.socketpair()
    ours = _CountingSocket(a.family, a.type, a.proto, fileno=a.detach())
    ours.setblocking(False)
    b.setblocking(False)
    return ours, b


def _websocket(sock: socket.socket, flusher: Flusher) -> WebSocket:
    return WebSocket(sock, b"", max_message_bytes=1000, outbox_frames=100, close_timeout=1.0, flusher=flusher)


def _pending(peer: socket.socket) -> bytes:
    try:
        return peer.recv(65536)
    except BlockingIOError:
        return b""


async def test_frames_sent_in_one_pass_leave_together_after_it(flusher: Flusher) -> None:
    ours, peer = _pair()
    other, other_peer = _pair()
    with ours, peer, other, other_peer:
        ws, ws2 = _websocket(ours, flusher), _websocket(other, flusher)
        ws.send(text_frame(b"a"))
        ws2.send(text_frame(b"x"))
        ws.send(text_frame(b"b"))
        assert _pending(peer) == b""  # nothing written during the pass
        await trio.testing.wait_all_tasks_blocked()
        assert _pending(peer) == text_frame(b"a") + text_frame(b"b")
        assert _pending(other_peer) == text_frame(b"x")
        assert (ours.sends, other.sends) == (1, 1)

        ws.send(text_frame(b"c"))  # a later pass: marked again
        await trio.testing.wait_all_tasks_blocked()
        assert _pending(peer) == text_frame(b"c")
        assert ours.sends == 2


async def test_a_long_pass_writes_once_max_pending_connections_wait(flusher: Flusher) -> None:
    pairs = [_pair() for _ in range(MAX_PENDING)]
    try:
        sockets = [_websocket(ours, flusher) for ours, _ in pairs]
        for ws in sockets[:-1]:
            ws.send(text_frame(b"m"))
        assert [_pending(peer) for _, peer in pairs] == [b""] * MAX_PENDING
        sockets[-1].send(text_frame(b"m"))  # the last one that may wait: all go now
        assert [_pending(peer) for _, peer in pairs] == [text_frame(b"m")] * MAX_PENDING
        await trio.testing.wait_all_tasks_blocked()  # the writer finds nothing left to do
        assert [ours.sends for ours, _ in pairs] == [1] * MAX_PENDING
    finally:
        for ours, peer in pairs:
            ours.close()
            peer.close()


async def test_send_now_writes_at_once_but_never_ahead_of_pending_frames() -> None:
    ours, peer = _pair()
    with ours, peer:
        flusher = Flusher()  # never runs
        ws = _websocket(ours, flusher)
        ws.send_now(text_frame(b"room 1"))
        assert _pending(peer) == text_frame(b"room 1")
        ws.send(text_frame(b"reply"))
        ws.send_now(text_frame(b"room 2"))  # behind the reply
        assert _pending(peer) == b""
        flusher.flush()
        assert _pending(peer) == text_frame(b"reply") + text_frame(b"room 2")


async def test_frames_for_one_connection_wait_at_most_outbox_frames() -> None:
    ours, peer = _pair()
    with ours, peer:
        ws = WebSocket(
            ours, b"", max_message_bytes=1000, outbox_frames=3, close_timeout=1.0, flusher=Flusher()
        )
        ws.send(text_frame(b"1"))
        ws.send(text_frame(b"2"))
        assert _pending(peer) == b""
        ws.send(text_frame(b"3"))  # as many as the backlog may hold: written now
        assert _pending(peer) == text_frame(b"1") + text_frame(b"2") + text_frame(b"3")


async def test_a_close_goes_out_after_the_frames_sent_before_it(flusher: Flusher) -> None:
    ours, peer = _pair()
    with ours, peer:
        ws = _websocket(ours, flusher)
        ws.send(text_frame(b"last words"))
        ws.close(1000)
        ws.send(text_frame(b"too late"))  # ignored: closing
        assert _pending(peer) == text_frame(b"last words") + CLOSE_1000
        await trio.testing.wait_all_tasks_blocked()
        assert _pending(peer) == b""


async def test_answering_a_peers_close_flushes_first() -> None:
    ours, peer = _pair()
    with ours, peer:
        ws = _websocket(ours, Flusher())  # never runs: only the close answer may flush

        async def on_message(frame: str | bytes | bytearray) -> None:
            raise AssertionError(f"no message expected, got {frame!r}")

        async with trio.open_nursery() as writers:
            writers.start_soon(ws.serve, on_message, writers)
            await trio.testing.wait_all_tasks_blocked()
            ws.send(text_frame(b"pending"))  # as a room broadcaster would
            peer.send(CLIENT_CLOSE_1000)
        assert ws.close_code == 1000
        assert _pending(peer) == text_frame(b"pending") + CLOSE_1000


class _Broken:
    aborted = False

    def flush(self) -> None:
        raise RuntimeError("a bug in one connection")

    def abort(self) -> None:
        self.aborted = True


async def test_one_failing_connection_neither_stops_the_others_nor_the_flusher(
    flusher: Flusher, caplog: pytest.LogCaptureFixture
) -> None:
    ours, peer = _pair()
    with ours, peer:
        ws = _websocket(ours, flusher)
        broken = _Broken()
        flusher.mark(broken)
        ws.send(text_frame(b"fine"))
        await trio.testing.wait_all_tasks_blocked()
        assert broken.aborted
        assert "event=flush_error" in caplog.text
        assert _pending(peer) == text_frame(b"fine")

        ws.send(text_frame(b"still fine"))  # the writer task is still there
        await trio.testing.wait_all_tasks_blocked()
        assert _pending(peer) == text_frame(b"still fine")


async def test_frames_marked_before_the_writer_first_runs_are_written() -> None:
    ours, peer = _pair()
    with ours, peer:
        flusher = Flusher()
        ws = _websocket(ours, flusher)
        ws.send(text_frame(b"early"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flusher.run)
            await trio.testing.wait_all_tasks_blocked()
            assert _pending(peer) == text_frame(b"early")
            nursery.cancel_scope.cancel()


async def test_a_match_announcement_is_written_at_once_other_deliveries_wait() -> None:
    ours, peer = _pair()
    with ours, peer:
        flusher = Flusher()  # never runs: only what is written at once arrives
        ws = _websocket(ours, flusher)
        async with open_hub() as hub:
            hub.attach(Client(user="u1", ws=ws, limiter=RateLimiter(0, 1, 1)))
            assert hub.deliver("u1", text_frame(b"relay"), m.WEBRTC_OFFER)
            assert _pending(peer) == b""
            assert hub.deliver("u1", text_frame(b"role"), m.ASSIGN_ROLE)
            assert _pending(peer) == text_frame(b"relay") + text_frame(b"role")
