"""A bare trio WebSocket handshake server: this machine's floor for handshakes per second.

One task per connection, as Aleatoria has: read the request head, answer 101 with the
accept token, then hold the connection until the client closes it; ``GET /health`` answers
200 (the reference load generator polls it first). Nothing else: no routing, no session, no
store. With ``--h11`` the head is parsed by h11 (issue 18's floor: "as the brief fixes"), with
``--httptools`` by httptools, as Aleatoria parses it since session 7; without either, by
looking for the blank line and the key header. Drive it with the reference generator:

    taskset -c 0 python scripts/handshake_floor.py --port 8095 [--h11] & SP=$!
    taskset -c 1 loadgen conns --n 5000 --hold 1s --url ws://127.0.0.1:8095 --server-pid $SP

and read ``srv CPU us/connect``. Usage: python scripts/handshake_floor.py --port P [--h11 | --httptools]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
from collections.abc import Awaitable, Callable
from functools import partial

import h11
import httptools
import trio
from wsproto.utilities import generate_accept_token

HEALTH = b'HTTP/1.1 200 OK\r\ncontent-length: 15\r\nconnection: close\r\n\r\n{"status":"ok"}'
SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: %s\r\n\r\n"
)


def _raw_head(head: bytes) -> tuple[bytes, bytes]:
    """(target, Sec-WebSocket-Key) of a complete request head."""
    lines = head.split(b"\r\n")
    target = lines[0].split(b" ")[1]
    key = b""
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    return target, key


def _h11_head(head: bytes) -> tuple[bytes, bytes]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    key = next((v for n, v in event.headers if n == b"sec-websocket-key"), b"")
    return event.target, key


class _Headers:
    def __init__(self) -> None:
        self.url = b""
        self.key = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"sec-websocket-key":
            self.key = value.strip()


def httptools_head(head: bytes) -> tuple[bytes, bytes]:
    headers = _Headers()
    with contextlib.suppress(httptools.HttpParserUpgrade):  # the head ends at the upgrade
        httptools.HttpRequestParser(headers).feed_data(head)
    return headers.url, headers.key


_PARSERS = {"raw": _raw_head, "h11": _h11_head, "httptools": httptools_head}


async def read_head(sock: socket.socket) -> bytes | None:
    """A request head (with whatever came after it in the same reads), or None when the
    client left first."""
    head = b""
    while b"\r\n\r\n" not in head:
        await trio.lowlevel.wait_readable(sock)
        try:
            data = sock.recv(8192)
        except BlockingIOError:
            continue
        if not data:
            return None
        head += data
    return head


async def serve(name: str, port: int, connection: Callable[[socket.socket], Awaitable[None]]) -> None:
    """Accept on 127.0.0.1:``port`` (0: any free port; the line printed names it) and run
    ``connection`` for each socket, one task each, as Aleatoria does."""
    listener = socket.create_server(("127.0.0.1", port), backlog=4096)
    listener.setblocking(False)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
    print(f"{name}: listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
    async with trio.open_nursery() as nursery:
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(256):
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    break
                sock.setblocking(False)
                nursery.start_soon(connection, sock)


def run_until_interrupted(
    name: str, port: int, connection: Callable[[socket.socket], Awaitable[None]]
) -> None:
    """``serve`` until Ctrl-C (or SIGTERM, which ends the process by default), then exit 130
    without a traceback: a user stops a floor by hand, ``compare.py`` by SIGTERM."""
    interrupted = False
    try:
        trio.run(serve, name, port, connection)
    except* KeyboardInterrupt:
        interrupted = True
    if interrupted:
        print(f"{name}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


async def _connection(sock: socket.socket, parser: str) -> None:
    with sock:
        head = await read_head(sock)
        if head is None:
            return
        target, key = _PARSERS[parser](head)
        if target.startswith(b"/health"):
            sock.send(HEALTH)
            return
        sock.send(SWITCHING % generate_accept_token(key))
        while True:  # hold until the client goes away
            await trio.lowlevel.wait_readable(sock)
            try:
                if not sock.recv(4096):
                    return
            except BlockingIOError:
                continue
            except OSError:
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8095)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--h11", action="store_true", help="parse request heads with h11")
    which.add_argument("--httptools", action="store_true", help="parse request heads with httptools")
    args = parser.parse_args()
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0..65535")
    head_parser = "h11" if args.h11 else "httptools" if args.httptools else "raw"
    run_until_interrupted("handshake_floor", args.port, partial(_connection, parser=head_parser))


if __name__ == "__main__":
    main()
