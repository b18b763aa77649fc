"""A tiny raw-socket WebSocket and HTTP client for protocol-edge tests.

Every byte is ours: the upgrade request is written by hand, client frames are built by
``frame`` (masked or not, any opcode, fragment flags, RSV bits, even a header that announces
more bytes than follow), and server frames are parsed here rather than by a library, so a
test sees exactly what the server put on the wire: pings, close codes, EOF or a reset.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import h11
import trio
from support import Target, tcp

TIMEOUT = 10.0

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample key: any 24-char base64 works


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
    length: int | None = None,
) -> bytes:
    """One client frame. ``length`` overrides the announced payload length (the payload
    that follows is still ``payload``); ``rsv`` sets the three RSV bits (0..7)."""
    announced = len(payload) if length is None else length
    head = bytearray([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode])
    mask_bit = 0x80 if mask else 0
    if announced < 126:
        head.append(mask_bit | announced)
    elif announced < 65536:
        head.append(mask_bit | 126)
        head += struct.pack("!H", announced)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", announced)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    head += key
    return bytes(head) + _xor(payload, key)


def _xor(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    repeated = (key * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(data), "big")


def text(message: Any) -> bytes:
    """A masked, final text frame carrying ``message`` (JSON-encoded unless str/bytes)."""
    if isinstance(message, bytes):
        return frame(TEXT, message)
    if not isinstance(message, str):
        message = json.dumps(message)
    return frame(TEXT, message.encode())


def close_frame(code: int | None = 1000, reason: bytes = b"") -> bytes:
    return frame(CLOSE, b"" if code is None else struct.pack("!H", code) + reason)


@attrs.frozen
class Frame:
    """One frame as the server sent it."""

    fin: bool
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        assert CLOSE == self.opcode, self
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    def json(self) -> Any:
        assert TEXT == self.opcode, self
        return json.loads(self.payload)


class RawStream:
    """A connection (TCP, or a socket pair in memory) with a read buffer: exact reads, EOF
    detection, resets."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        try:
            chunk = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            chunk = b""  # connection reset: for a test, the same as EOF
        self.buffer += chunk
        return bool(chunk)

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not await self._fill():
                raise EOFError(f"EOF after {len(self.buffer)} of {n} bytes")
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def read_until(self, marker: bytes, limit: int = 1 << 20) -> bytes:
        while (end := self.buffer.find(marker)) < 0:
            if len(self.buffer) > limit or not await self._fill():
                raise EOFError(f"no {marker!r} in {bytes(self.buffer[:200])!r}")
        end += len(marker)
        data = bytes(self.buffer[:end])
        del self.buffer[:end]
        return data

    async def read_to_eof(self) -> bytes:
        while await self._fill():
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def expect_eof(self, timeout: float = TIMEOUT) -> None:
        """Wait until the server closes the connection (FIN or reset), discarding nothing:
        any byte that arrives first fails the test."""
        with trio.fail_after(timeout):
            while await self._fill():
                pass
        assert b"" == bytes(self.buffer)

    def reset_on_close(self) -> None:
        """Make ``aclose`` send an RST instead of a FIN (SO_LINGER with a zero timeout)."""
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def open_tcp(server: Target | int) -> AsyncIterator[RawStream]:
    """A raw connection to ``server`` (a ``Target``, or a port on 127.0.0.1)."""
    stream = await tcp(server).open_stream()
    raw = RawStream(stream)
    try:
        yield raw
    finally:
        await raw.aclose()


def upgrade_request(
    port: int,
    target: str,
    *,
    method: str = "GET",
    origin: str | None = None,
    headers: dict[str, str] | None = None,
    upgrade: bool = True,
) -> bytes:
    """A WebSocket upgrade request head (or a plain GET with ``upgrade=False``)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if upgrade:
        lines += [
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {_KEY}",
            "Sec-WebSocket-Version: 13",
        ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@attrs.frozen
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_response(data: bytes, *, method: str = "GET") -> Response:
    """Parse one complete HTTP/1.1 response (the server closes after it) with h11."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    head = conn.next_event()
    assert isinstance(head, (h11.Response, h11.InformationalResponse)), head
    headers = {k.decode(): v.decode("latin-1") for k, v in head.headers}
    body = b""
    if isinstance(head, h11.Response):
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data), event
            body += event.data
    return Response(head.status_code, headers, body)


async def http_exchange(server: Target | int, request: bytes, *, method: str = "GET") -> Response:
    """Send raw request bytes, read until the server closes, parse the response."""
    async with open_tcp(server) as conn:
        with trio.fail_after(TIMEOUT):
            await conn.send(request)
            data = await conn.read_to_eof()
    return parse_response(data, method=method)


async def http_get(server: Target | int, target: str, *, method: str = "GET") -> Response:
    port = tcp(server).port
    request = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    return await http_exchange(server, request.encode("latin-1"), method=method)


async def health(server: Target | int) -> dict[str, Any]:
    response = await http_get(server, "/health")
    assert 200 == response.status, response
    parsed: dict[str, Any] = json.loads(response.body)
    return parsed


class RawWebSocket(RawStream):
    """An upgraded connection; frames are read and written by hand."""

    async def send_frame(self, data: bytes) -> None:
        await self.send(data)

    async def send_json(self, message: Any) -> None:
        await self.send(text(message))

    async def read_frame(self, timeout: float = TIMEOUT) -> Frame:
        """The next server frame, whatever it is. Server frames must be unmasked."""
        with trio.fail_after(timeout):
            b0, b1 = await self.read_exactly(2)
            assert 0 == b1 & 0x80, "server frames must not be masked"
            length = b1 & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.read_exactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.read_exactly(8))
            payload = await self.read_exactly(length)
        return Frame(bool(b0 & 0x80), b0 & 0x0F, payload)

    async def recv_json(self, timeout: float = TIMEOUT, *, answer_pings: bool = True) -> Any:
        """The next data message as JSON; server pings are answered (or ignored) on the way.
        A close frame fails the test."""
        with trio.fail_after(timeout):
            while True:
                got = await self.read_frame()
                if got.opcode == PING:
                    if answer_pings:
                        await self.send(frame(PONG, got.payload))
                    continue
                assert TEXT == got.opcode, got
                return got.json()

    async def expect(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        message: dict[str, Any] = await self.recv_json(timeout)
        assert kind == message["type"], message
        return message

    async def expect_close(self, timeout: float = TIMEOUT) -> Frame:
        """Read (skipping pings and data) until the server's close frame; return it."""
        with trio.fail_after(timeout):
            while True:
                got = await self.read_frame()
                if got.opcode == CLOSE:
                    return got

    async def roundtrip(self) -> None:
        """Application-level ping -> pong: the connection works."""
        await self.send_json({"type": "ping"})
        await self.expect("pong")


def _head_fields(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    return {name.strip().lower(): value.strip() for name, value in pairs}


async def read_response_head(conn: RawStream) -> Response:
    """Read an HTTP response head (and, for non-101 answers, the body up to EOF)."""
    with trio.fail_after(TIMEOUT):
        head = await conn.read_until(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status == 101:
            return Response(101, _head_fields(head), b"")
        rest = await conn.read_to_eof()
    return parse_response(head + rest)


@asynccontextmanager
async def open_raw_ws(
    server: Target | int,
    user: str = "raw",
    room: str | None = None,
    *,
    joined: bool = True,
    first_bytes: bytes = b"",
    rcvbuf: int | None = None,
    query: str = "",
) -> AsyncIterator[RawWebSocket]:
    """Upgrade a raw connection to ``server`` (a ``Target``, or a port on 127.0.0.1); by
    default wait for the initial ``room_joined``. ``first_bytes`` go out in the same write
    as the request head; ``rcvbuf`` makes a small receive buffer (a slow reader); ``query``
    is added to the URL (``&v=2``)."""
    where = tcp(server)
    ws = RawWebSocket(await where.open_stream(rcvbuf=rcvbuf))
    try:
        target = f"/ws?userId={user}" + (f"&room={room}" if room else "") + query
        await ws.send(upgrade_request(where.port, target) + first_bytes)
        response = await read_response_head(ws)
        assert 101 == response.status, response
        if joined:
            await ws.expect("room_joined")
        yield ws
    finally:
        await ws.aclose()
