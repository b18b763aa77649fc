"""A bare trio relay of direct messages: this machine's floor for a DM round trip.

What a DM costs the server at the sockets, and nothing else. One task per connection, as
Aleatoria has; each WebSocket text frame a client sends is unmasked, its ``"toUser"`` found
by a byte search, and the same bytes sent as a server frame to that user and back to the
sender (the sender's copy), each by one ``send`` straight to the kernel. No JSON parse, no
checks, no ids, no history, no session: the reference generator's ``dm`` scenario only
reads ``content``, which the copy carries unchanged. A round trip there is two messages in
and four frames out, so this floor against ``echo_floor.py`` (one in, one out) is what
the socket pattern alone costs; Aleatoria against this floor is what its own work costs.

    taskset -c 0 python scripts/dm_floor.py --port 8096 & SP=$!
    taskset -c 1 loadgen dm --pairs 50 --duration 8s --url ws://127.0.0.1:8096 --server-pid $SP

or as a ``--server`` of ``compare.py`` beside ``aleatoria serve``, and read the server CPU
per round trip. Request heads are parsed by httptools, as Aleatoria parses them.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import struct
from urllib.parse import parse_qs

import httptools
import trio
from wsproto.utilities import generate_accept_token

_HEALTH = b'HTTP/1.1 200 OK\r\ncontent-length: 15\r\nconnection: close\r\n\r\n{"status":"ok"}'
_SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: %s\r\n\r\n"
)
_TO_USER = b'"toUser":"'
_RECV_BYTES = 65536  # as aleatoria.connection


class _Head:
    def __init__(self) -> None:
        self.url = b""
        self.key = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"sec-websocket-key":
            self.key = value.strip()


def _frame(payload: bytes) -> bytes:
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    return struct.pack("!BBH", 0x81, 126, length) + payload


def _frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Take the whole client frames (opcode, unmasked payload) off the front of ``buffer``."""
    out = []
    while len(buffer) >= 6:
        opcode, size = buffer[0] & 0x0F, buffer[1] & 0x7F
        start = 6
        if size == 126:
            if len(buffer) < 8:
                break
            size, start = int.from_bytes(buffer[2:4], "big"), 8
        elif size == 127:
            raise ValueError("frames over 64 KiB are not part of this floor")
        if len(buffer) < start + size:
            break
        mask = bytes(buffer[start - 4 : start])
        key = int.from_bytes((mask * (size // 4 + 1))[:size], "little")
        masked = int.from_bytes(buffer[start : start + size], "little")
        out.append((opcode, (masked ^ key).to_bytes(size, "little")))
        del buffer[: start + size]
    return out


async def _connection(sock: socket.socket, users: dict[bytes, socket.socket]) -> None:
    with sock:
        head = b""
        while b"\r\n\r\n" not in head:
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(8192)
            except BlockingIOError:
                continue
            if not data:
                return
            head += data
        parsed = _Head()
        with contextlib.suppress(httptools.HttpParserUpgrade):  # the head ends at the upgrade
            httptools.HttpRequestParser(parsed).feed_data(head)
        if parsed.url.startswith(b"/health"):
            sock.send(_HEALTH)
            return
        query = parse_qs(httptools.parse_url(parsed.url).query.decode())
        user = query["userId"][0].encode()
        sock.send(_SWITCHING % generate_accept_token(parsed.key))
        users[user] = sock
        try:
            await _relay(sock, users)
        finally:
            if users.get(user) is sock:
                del users[user]


async def _relay(sock: socket.socket, users: dict[bytes, socket.socket]) -> None:
    buffer = bytearray()
    short_read = True
    while True:
        # Wait for the kernel only after it had less than a full read, as Aleatoria does.
        if short_read:
            await trio.lowlevel.wait_readable(sock)
        else:
            await trio.lowlevel.checkpoint()
        try:
            data = sock.recv(_RECV_BYTES)
        except BlockingIOError:
            short_read = True
            continue
        except OSError:
            return
        if not data:
            return
        short_read = len(data) < _RECV_BYTES
        buffer += data
        for opcode, payload in _frames(buffer):
            if opcode == 0x8:
                return
            if opcode != 0x1:
                continue
            at = payload.find(_TO_USER)
            if at < 0:
                continue
            at += len(_TO_USER)
            peer = users.get(payload[at : payload.index(b'"', at)])
            frame = _frame(payload)
            if peer is not None:
                peer.send(frame)
            sock.send(frame)


async def _serve(port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=4096)
    listener.setblocking(False)
    print(f"dm_floor: listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
    users: dict[bytes, socket.socket] = {}
    async with trio.open_nursery() as nursery:
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(256):
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    break
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nursery.start_soon(_connection, sock, users)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8096, help="0: any free port (printed)")
    trio.run(_serve, parser.parse_args().port)


if __name__ == "__main__":
    main()
