"""The in-memory test tier: the whole server (``aleatoria.server.serve_unlistened``: store,
hub, router, supervisor, sessions) without a listener, on trio's clock (tests may use
``autojump_clock``). A test reaches it two ways, and neither binds or connects a socket:

- ``connect`` runs the same session set-up and clean-up as a real connection
  (``Server.start_session``/``end_session``) around a ``RecordingSocket`` and hands back a
  ``FakePeer``: the ``support.Peer`` vocabulary (``send``, ``recv``, ``expect``,
  ``request``, ``sync``), so a protocol test reads the same in both tiers. No bytes, no
  thread: 20 exchanges run in milliseconds and a missing reply fails at once (the clock
  jumps to the timeout).
- ``InMemoryServer.open_stream`` (a ``support.Target``) gives the real connection handler
  one end of a ``socket.socketpair()`` (``Server.serve_connection``): the HTTP routes, the
  admin API, the handshake, the frame parser and budget, closes -- all of the edge but the
  listener and TCP, with ``support.connect``, ``rawws`` and ``adminapi`` as the client.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from support import TIMEOUT, Peer, make_config

from aleatoria.config import Config
from aleatoria.server import Server, serve_unlistened
from aleatoria.session import Session


class Closed(Exception):
    """The server closed this peer's connection (``code``, ``reason``)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class RecordingSocket:
    """Stands in for ``WebSocket``: keeps every frame the server sends, decoded."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.last_seen = trio.current_time()
        self.pings = 0
        self._arrived = trio.Event()

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    def send(self, data: bytes, frames: int = 1) -> None:
        if self.close_code is not None:
            return
        for payload in _frames(data):
            self.received.append(json.loads(payload))
        self._wake()

    send_now = send

    def flush(self) -> None:
        pass

    def ping(self) -> None:
        """The fake client answers at once: a pong counts as hearing from it."""
        self.pings += 1
        self.last_seen = trio.current_time()

    def close(self, code: int, reason: str = "") -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self._wake()

    def abort(self) -> None:
        self.close(1006, "aborted")

    def _wake(self) -> None:
        self._arrived.set()
        self._arrived = trio.Event()

    async def next(self, timeout: float) -> dict[str, Any]:
        """The oldest frame not yet read; raises Closed once the server closed and nothing
        is left."""
        with trio.fail_after(timeout):
            while not self.received:
                if self.close_code is not None:
                    raise Closed(self.close_code, self.close_reason)
                await self._arrived.wait()
        return self.received.pop(0)


def _frames(data: bytes) -> list[bytes]:
    """The payloads of the unmasked text frames in ``data`` (several may be joined)."""
    out = []
    pos = 0
    while pos < len(data):
        opcode, size, head = data[pos] & 0x0F, data[pos + 1] & 0x7F, 2
        if size == 126:
            size, head = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
        elif size == 127:
            size, head = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
        if opcode == 0x1:
            out.append(data[pos + head : pos + head + size])
        pos += head + size
    return out


@attrs.define
class FakePeer(Peer):
    """A connected user of the in-memory tier, handed straight to its session."""

    user: str
    socket: RecordingSocket
    session: Session
    server: Server
    ended: bool = False
    welcome: dict[str, Any] | None = None  # level 2: the first frame

    async def send(self, message: dict[str, Any] | str) -> None:
        """Hand one frame to the session, as the connection's receive loop does."""
        if self.socket.close_code is not None:
            raise Closed(self.socket.close_code, self.socket.close_reason)
        self.socket.last_seen = trio.current_time()
        await self.session.handle(message if isinstance(message, str) else json.dumps(message))

    async def disconnect(self) -> None:
        """The client goes away (as a dropped connection would)."""
        if not self.ended:
            self.ended = True
            self.socket.close(1006, "gone")
            await self.server.end_session(self.session)

    async def drop(self, code: int = 1006) -> None:
        """The connection ends without a close frame from the client (1006; or ``code``, as
        a client's close frame): a level-2 session is then kept for a resume."""
        if not self.ended:
            self.ended = True
            self.socket.close(code, "dropped")
            if not self.server.keep_session(self.session, code):
                await self.server.end_session(self.session)

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        return await self.socket.next(timeout)

    @property
    def token(self) -> str:
        assert self.welcome is not None
        token: str = self.welcome["payload"]["resumeToken"]
        return token


@attrs.define
class InMemoryServer:
    """The in-memory tier's server; a ``support.Target`` over socket pairs."""

    server: Server
    # The port clients name in their Host header (and same-origin Origins): nothing listens.
    port: int = 8080

    @property
    def config(self) -> Config:
        return self.server.config

    async def open_stream(self, *, rcvbuf: int | None = None) -> trio.SocketStream:
        """A connection served by the real handler, as if accepted from 127.0.0.1."""
        ours, theirs = socket.socketpair()
        if rcvbuf is not None:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.server._tasks.start_soon(self.server.serve_connection, theirs)
        return trio.SocketStream(trio.socket.from_stdlib_socket(ours))


@asynccontextmanager
async def inmemory_server(**overrides: Any) -> AsyncIterator[InMemoryServer]:
    """The whole server without a listener (``make_config(**overrides)``); shut down
    gracefully on exit, as ``serve`` is."""
    config = make_config(**overrides)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_unlistened, config)
        yield InMemoryServer(server)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def connect(
    server: InMemoryServer,
    user: str,
    room: str | None = None,
    *,
    joined: bool = True,
    v: int = 1,
    resume: str | None = None,
) -> AsyncIterator[FakePeer]:
    """Connect ``user`` (by default waiting for the ``room_joined`` of its room); on exit the
    connection ends as a dropped one would (``end_session``). ``v=2``: a level-2 connection
    (``resume``: the token it presents); its ``welcome`` is read first (``peer.welcome``),
    and a resumed session waits for no ``room_joined``."""
    socket = RecordingSocket()
    # The handshake's read of the user's ban and blocks (a ban refuses it with 403).
    admission = await server.server.store.safety.admit(user, time.time())
    if admission.refused:
        raise Closed(403, "banned")
    session = server.server.new_session(socket, user, admission=admission)  # type: ignore[arg-type]
    peer = FakePeer(user, socket, session, server.server)
    hello = None if v == 1 else resume or ""
    session.client.level2 = hello is not None
    try:
        await server.server.start_session(session, room or "Lobby", hello)
        if hello is not None:
            peer.welcome = await peer.expect("welcome")
            joined = joined and not peer.welcome["payload"].get("resumed")
        if joined:
            await peer.expect("room_joined")
        yield peer
    finally:
        with trio.CancelScope(shield=True):
            if not peer.ended:
                peer.ended = True
                socket.close(1000, "gone")
                await server.server.end_session(session)
