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
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from urllib.parse import parse_qs

import httptools
import trio
from handshake_floor import HEALTH, SWITCHING, httptools_head, read_head, run_until_interrupted  # beside this
from wsproto.utilities import generate_accept_token

from aleatoria.frames import text_frame

_TO_USER = b'"toUser":"'
_RECV_BYTES = 65536  # as aleatoria.connection


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


async def handshake(sock: socket.socket) -> bytes | None:
    """Read the request head and answer it: ``/health`` gets 200 and None, an upgrade 101 and
    its ``userId``."""
    head = await read_head(sock)
    if head is None:
        return None
    target, key = httptools_head(head)
    if target.startswith(b"/health"):
        sock.send(HEALTH)
        return None
    user = parse_qs(httptools.parse_url(target).query.decode())["userId"][0].encode()
    sock.send(SWITCHING % generate_accept_token(key))
    return user


async def read_text(sock: socket.socket, on_text: Callable[[bytes], Awaitable[None] | None]) -> None:
    """Call ``on_text`` with each text frame's unmasked payload until the client closes (and
    wait for what it returns, if anything, before the next frame)."""
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
            if opcode == 0x1 and (pending := on_text(payload)) is not None:
                await pending


async def _connection(sock: socket.socket, users: dict[bytes, socket.socket]) -> None:
    with sock:
        user = await handshake(sock)
        if user is None:
            return
        users[user] = sock
        try:
            await read_text(sock, partial(_relay, sock, users))
        finally:
            if users.get(user) is sock:
                del users[user]


def _relay(sock: socket.socket, users: dict[bytes, socket.socket], payload: bytes) -> None:
    at = payload.find(_TO_USER)
    if at < 0:
        return
    at += len(_TO_USER)
    peer = users.get(payload[at : payload.index(b'"', at)])
    frame = text_frame(payload)
    if peer is not None:
        peer.send(frame)
    sock.send(frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8096, help="0: any free port (printed)")
    users: dict[bytes, socket.socket] = {}
    port = parser.parse_args().port
    if not 0 <= port <= 65535:
        parser.error("--port must be 0..65535")
    run_until_interrupted("dm_floor", port, partial(_connection, users=users))


if __name__ == "__main__":
    main()
