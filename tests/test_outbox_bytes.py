"""Outboxes are bounded in bytes too (PROTOCOL.md section 16): ``outbox_bytes`` as well as
``outbox_frames``, counting the bytes waiting behind the entry being written, for the
backlog and for the frames waiting for the flusher; over either bound: 1013.

The first tests drive one ``WebSocket`` over a socket pair whose peer does not read (no
writer task runs, so what the kernel refuses stays queued); the last ones go through a real
server over TCP.
"""

from __future__ import annotations

import gc
import math
import socket
from typing import Any

import pytest
import trio
from rawws import CLOSE, TEXT, open_raw_ws
from support import connect, running_server

from aleatoria.connection import WebSocket
from aleatoria.flusher import Flusher
from aleatoria.frames import text_frame

pytestmark = pytest.mark.loopback  # a TCP reader that stops reading (kernel buffers fill)

BOUND = 64 * 1024
FRAME = text_frame(b"x" * 4000)


def _pair() -> tuple[socket.socket, socket.socket]:
    """A socket pair with small kernel buffers, so that a backlog forms quickly."""
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ours.setblocking(False)
    peer.setblocking(False)
    return ours, peer


def _websocket(sock: socket.socket) -> WebSocket:
    """A connection bounded by bytes only (``outbox_frames`` is far away)."""
    return WebSocket(
        sock,
        b"",
        max_message_bytes=1000,
        outbox_frames=1_000_000,
        close_timeout=1.0,
        flusher=Flusher(),  # never runs
        outbox_bytes=BOUND,
    )


def _fill_kernel(ws: WebSocket) -> None:
    """Send until the kernel takes no more and a backlog exists."""
    while not ws._backlog:
        ws.send_now(FRAME)


async def test_backlog_over_outbox_bytes_behind_the_entry_being_written_closes_1013() -> None:
    ours, peer = _pair()
    with ours, peer:
        ws = _websocket(ours)
        _fill_kernel(ws)
        head = len(ws._backlog[0])
        behind = 0
        while behind + len(FRAME) <= BOUND:  # up to the bound: queued
            ws.send_now(FRAME)
            behind += len(FRAME)
            assert ws.close_code is None
        assert head + behind == ws._queued_bytes
        ws.send_now(FRAME)  # one more would pass it
        assert 1013 == ws.close_code
        # What the client would never read is dropped; the entry in flight stays, so the
        # close frame behind it is still parseable.
        assert 2 == len(ws._backlog)
        assert head == len(ws._backlog[0])
        assert bytes(ws._backlog[1]).startswith(b"\x88")
        assert head + len(ws._backlog[1]) == ws._queued_bytes


async def test_one_large_frame_being_written_does_not_count() -> None:
    """A frame far larger than the bound, being written (a history reply to a client that
    reads), leaves the whole bound for the frames behind it."""
    ours, peer = _pair()
    with ours, peer:
        ws = _websocket(ours)
        ws.send_now(text_frame(b"h" * (16 * BOUND)))
        assert 1 == len(ws._backlog)  # the rest of it, being written
        assert ws._queued_bytes > 15 * BOUND
        for _ in range(BOUND // len(FRAME)):
            ws.send_now(FRAME)
        assert ws.close_code is None
        ws.send_now(FRAME)
        assert 1013 == ws.close_code


async def test_frames_waiting_for_the_flusher_are_written_once_they_reach_outbox_bytes() -> None:
    ours, peer = _pair()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    with ours, peer:
        ws = _websocket(ours)
        fits = math.ceil(BOUND / len(FRAME)) - 1  # frames that stay under the bound together
        for _ in range(fits):
            ws.send(FRAME)
        assert ws._cork is not None and fits * len(FRAME) == ws._cork_bytes
        assert 0 == ws._queued_bytes and not ws._backlog  # nothing written yet
        ws.send(FRAME)  # reaches the bound: written now, as the frame bound does
        assert ws._cork is None
        assert (fits + 1) * len(FRAME) == ws._queued_bytes + _drain(peer)


def _drain(peer: socket.socket) -> int:
    received = 0
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return received
        received += len(chunk)


async def test_writer_accounts_for_every_byte_it_writes() -> None:
    """The writer task empties the backlog, partial writes included, back to 0 bytes and
    0 frames queued, and the peer gets every byte in order."""
    ours, peer = _pair()
    with ours, peer:
        ws = _websocket(ours)
        frames = [text_frame(b"%d " % i + b"y" * (i * 37 % 5000)) for i in range(60)]
        for data in frames:
            ws.send_now(data)
        assert ws._backlog and ws.close_code is None
        expected = b"".join(frames)
        received = bytearray()

        async def read_all() -> None:
            while len(received) < len(expected):
                await trio.lowlevel.wait_readable(peer)
                received.extend(peer.recv(65536))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all)
                await ws._write_backlog()
        assert (0, 0, []) == (ws._queued_bytes, ws._queued_frames, ws._backlog)
        assert expected == bytes(received)


# -- over TCP ---------------------------------------------------------------------------------


async def test_client_not_reading_is_closed_1013_by_the_byte_bound() -> None:
    """A member that never reads while a room sends it 4 KB frames is closed with 1013 once
    what waits for it passes ``outbox_bytes``, long before ``outbox_frames`` could trip;
    it gets a gapless prefix first, and the other members get everything."""
    total = 1500  # 6 MB: beyond the bound and the kernel buffers (tcp_wmem allows up to 4 MB)
    content = "x" * 3990
    async with (
        running_server(outbox_frames=1_000_000, outbox_bytes=BOUND, close_timeout=30.0) as server,
        open_raw_ws(server.port, "slow", "Big", rcvbuf=4096) as slow,
        connect(server, "watcher", "Big") as watcher,
        connect(server, "sender", "Big") as sender,
    ):
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def send_all() -> None:
                    for i in range(total):
                        payload = {"content": f"{i} {content}"}
                        await sender.send({"type": "chat_message", "room": "Big", "payload": payload})

                async def drain_own_echoes() -> None:
                    for _ in range(total):
                        await sender.expect("chat_message")

                nursery.start_soon(send_all)
                nursery.start_soon(drain_own_echoes)
                for i in range(total):
                    message = await watcher.expect("chat_message")
                    assert i == int(message["payload"]["content"].split()[0])
            # Every frame was handed to the slow member's connection: only now does it read.
            seen = 0
            while (got := await slow.read_frame()).opcode != CLOSE:
                assert TEXT == got.opcode, got
                message = got.json()
                if message["type"] == "chat_message":
                    assert seen == int(message["payload"]["content"].split()[0])
                    seen += 1
        assert 1013 == got.close_code, got
        assert 0 < seen < total
        await sender.request({"type": "ping"}, "pong")


async def test_history_replies_fit_in_outbox_bytes_and_page_on() -> None:
    """A history reply holds as many messages as fit in ``outbox_bytes`` (the frame being
    written is not counted by that bound: 200 stored 32 KB messages were a 6.5 MB reply a
    client could leave unread on each of its connections). A client that reads gets it
    through small kernel buffers with its pongs behind, and pages on with ``before`` and
    ``after`` to every message, none twice; a DM reply keeps the newest."""
    content = "h" * 3990
    total = 200
    async with running_server(outbox_bytes=BOUND) as server:
        async with connect(server, "writer", "History") as writer:
            for i in range(total):
                payload = {"content": f"{i} {content}"}
                await writer.send({"type": "chat_message", "room": "History", "payload": payload})
                await writer.send({"type": "chat_message", "toUser": "reader", "payload": payload})
            for _ in range(2 * total):
                await writer.expect("chat_message")
        async with open_raw_ws(server.port, "reader", "History", rcvbuf=4096) as reader:
            # White-box: a small send buffer on the server's side of this connection (Linux
            # would grow it to megabytes), so that the reply is written from the backlog.
            [server_ws] = [o for o in gc.get_objects() if isinstance(o, WebSocket) and not o.closing]
            server_ws._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

            async def page(extra: dict[str, object]) -> list[dict[str, Any]]:
                request = {
                    "type": "get_recent_messages",
                    "room": "History",
                    "payload": {"limit": total, **extra},
                }
                await reader.send_json(request)
                await reader.send_json({"type": "ping"})
                got = await reader.read_frame()
                assert len(got.payload) <= BOUND
                if not extra:  # a first page is filled up to the bound
                    assert len(got.payload) > BOUND // 2
                reply = got.json()
                assert "recent_messages" == reply["type"]
                await reader.expect("pong")
                messages: list[dict[str, Any]] = reply["payload"]["messages"]
                return messages

            def numbers(messages: list[dict[str, Any]]) -> list[int]:
                return [int(message["payload"]["content"].split()[0]) for message in messages]

            backward: list[int] = []
            cursor: dict[str, object] = {}
            while len(backward) < total:
                messages = await page(cursor)
                assert 0 < len(messages) < total
                backward += numbers(messages)
                cursor = {"before": messages[-1]["createTime"]}
            assert list(range(total - 1, -1, -1)) == backward  # newest first, gapless

            forward: list[int] = []
            cursor = {"after": "1970-01-01T00:00:00Z"}
            while len(forward) < total:
                messages = await page(cursor)
                forward += numbers(messages)
                cursor = {"after": messages[-1]["createTime"]}
            assert list(range(total)) == forward  # oldest first, gapless

            await reader.send_json(
                {"type": "get_direct_messages", "payload": {"withUser": "writer", "limit": total}}
            )
            got = await reader.read_frame()
            assert len(got.payload) <= BOUND
            dms = numbers(got.json()["payload"]["messages"])
            assert dms == list(range(total - len(dms), total))  # the newest, oldest first
            assert 0 < len(dms) < total
            await reader.roundtrip()
