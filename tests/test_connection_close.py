"""How a connection ends (``aleatoria.connection.WebSocket``): its receive loop has no cancel
scope of its own, so ``abort`` must wake a wait on the socket and a closing connection must
be dropped at its deadline by a timer. Over a socket pair, on trio's autojump clock."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing
from rawws import CLOSE, frame

from aleatoria.connection import WebSocket
from aleatoria.flusher import Flusher
from aleatoria.frames import ABNORMAL, Message

CLOSE_TIMEOUT = 5.0


class _Served:
    """A WebSocket being served, its peer's socket, and what ``serve`` returned."""

    def __init__(self, ws: WebSocket, peer: socket.socket) -> None:
        self.ws = ws
        self.peer = peer
        self.code: int | None = None
        self.ended = trio.Event()
        self.ended_at = 0.0

    async def serve(self, writers: trio.Nursery) -> None:
        async def ignore(_: Message) -> None:
            pass

        self.code = await self.ws.serve(ignore, writers)
        self.ended_at = trio.current_time()
        self.ended.set()

    async def peer_reads_to_eof(self) -> bytes:
        data = b""
        while True:
            await trio.lowlevel.wait_readable(self.peer)
            chunk = self.peer.recv(65536)
            if not chunk:
                return data
            data += chunk


@asynccontextmanager
async def _served() -> AsyncIterator[_Served]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    ws = WebSocket(
        ours,
        b"",
        max_message_bytes=1000,
        outbox_frames=100,
        close_timeout=CLOSE_TIMEOUT,
        flusher=Flusher(),  # not run: ``close`` flushes what it sends itself
    )
    served = _Served(ws, peer)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(served.serve, nursery)
            await trio.testing.wait_all_tasks_blocked()  # the loop waits on the socket
            yield served
            with trio.fail_after(60):
                await served.ended.wait()
            assert 0 == len(nursery.child_tasks)  # no timer or writer left behind
    finally:
        peer.close()


async def test_abort_wakes_the_waiting_loop(autojump_clock: trio.testing.MockClock) -> None:
    async with _served() as served:
        start = trio.current_time()
        served.ws.abort()
        await served.ended.wait()
        assert (ABNORMAL, start) == (served.code, served.ended_at)  # at once
        assert b"" == await served.peer_reads_to_eof()  # dropped: no close frame


async def test_a_silent_peer_is_dropped_at_the_close_deadline(autojump_clock: trio.testing.MockClock) -> None:
    async with _served() as served:
        start = trio.current_time()
        served.ws.close(1000, "bye")
        sent = await served.peer_reads_to_eof()  # the close frame, then the drop
        assert CLOSE == sent[0] & 0x0F
        await served.ended.wait()
        assert 1000 == served.code
        assert served.ended_at - start == CLOSE_TIMEOUT


async def test_an_answered_close_ends_before_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    async with _served() as served:
        start = trio.current_time()
        served.ws.close(1000, "bye")
        served.peer.send(frame(CLOSE, (1000).to_bytes(2, "big")))
        await served.ended.wait()
        assert (1000, start) == (served.code, served.ended_at)
