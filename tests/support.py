"""The test helpers of every tier: one client vocabulary (``Peer``) and one way to reach a
server (``Target``).

- ``Peer``: what a test says to the server and hears back -- ``send``, ``recv``, ``expect``
  (the next message must be of a type; ``skip=True``: the next of that type), ``request``
  (send, then expect the reply) and ``sync`` (a ping round trip). ``SocketPeer`` speaks it
  over a real WebSocket (trio-websocket); ``inmemory.FakePeer`` over a recording socket
  handed straight to a session.
- ``Target``: where a connection goes. ``running_server`` (loopback tier: ``serve`` on port
  0) and ``inmemory.inmemory_server`` (in-memory tier: no listener, each connection one end
  of a ``socket.socketpair()``) both are one; a bare port (a server in a subprocess) is
  one too, through ``tcp``. ``connect``, ``rawws`` and ``adminapi`` take any of them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from aleatoria.config import Config
from aleatoria.server import serve

TIMEOUT = 10.0


def make_config(**overrides: Any) -> Config:
    """A test configuration: port 0, no rate limits (messages, peer requests) unless a test
    asks for one."""
    values: dict[str, Any] = {"port": 0, "rate_limit": 0.0, "match_rate": 0.0}
    values.update(overrides)
    return Config(**values)


class Target(Protocol):
    """A server a test can open connections to. ``port`` is the one clients name in their
    ``Host`` header (a nominal one in memory)."""

    @property
    def port(self) -> int: ...

    async def open_stream(self, *, rcvbuf: int | None = None) -> trio.SocketStream:
        """A new connection to the server (``rcvbuf``: the client's receive buffer)."""
        ...


@attrs.frozen
class Tcp:
    """A server listening on 127.0.0.1:``port`` (in this process or another)."""

    port: int

    async def open_stream(self, *, rcvbuf: int | None = None) -> trio.SocketStream:
        sock = trio.socket.socket()
        try:
            if rcvbuf is not None:
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, rcvbuf)
            await sock.connect(("127.0.0.1", self.port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)


def tcp(where: Target | int) -> Target:
    """``where`` as a target: a bare port is a TCP server on 127.0.0.1."""
    return Tcp(where) if isinstance(where, int) else where


@attrs.define
class RunningServer:
    """The loopback tier's server: ``serve`` in this process, on a real port."""

    port: int
    config: Config
    scope: trio.CancelScope

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def open_stream(self, *, rcvbuf: int | None = None) -> trio.SocketStream:
        return await Tcp(self.port).open_stream(rcvbuf=rcvbuf)


@asynccontextmanager
async def running_server(config: Config | None = None, /, **overrides: Any) -> AsyncIterator[RunningServer]:
    """Start ``serve`` in-process on port 0 with ``config`` (or ``make_config(**overrides)``);
    stop it (gracefully) on exit."""
    if config is None:
        config = make_config(**overrides)
    else:
        assert not overrides, "give a config or overrides, not both"
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, config)
        yield RunningServer(port, config, nursery.cancel_scope)
        nursery.cancel_scope.cancel()


def close_of(exc: ConnectionClosed) -> tuple[int, str]:
    """The close code and reason a client saw (1006 when the connection just broke)."""
    reason = exc.reason
    return (1006, "") if reason is None else (reason.code, reason.reason or "")


class Peer(Protocol):
    """One connected user, as a test talks to it: the same methods in every tier."""

    user: str

    async def send(self, message: dict[str, Any] | str) -> None:
        """Send one message (a dict is sent as JSON, a str as is)."""
        ...

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next message from the server, within ``timeout``."""
        ...

    async def expect(self, kind: str, timeout: float = TIMEOUT, *, skip: bool = False) -> dict[str, Any]:
        """The next message, which must be of type ``kind``; with ``skip``, the next one of
        that type (others are dropped: for tests where unrelated traffic may come first)."""
        while True:
            message = await self.recv(timeout)
            if not skip or kind == message["type"]:
                assert kind == message["type"], message
                return message

    async def request(self, message: dict[str, Any], reply: str, *, skip: bool = False) -> dict[str, Any]:
        """Send ``message``; its ``reply`` (see ``expect`` for ``skip``)."""
        await self.send(message)
        return await self.expect(reply, skip=skip)

    async def sync(self) -> None:
        """Round trip: everything this client's earlier messages caused here has arrived
        (what came before the ``pong`` is dropped)."""
        await self.request({"type": "ping"}, "pong", skip=True)


class SocketPeer(Peer):
    """A ``Peer`` over a real WebSocket connection (trio-websocket)."""

    def __init__(self, ws: WebSocketConnection, user: str) -> None:
        self.ws = ws
        self.user = user

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.ws.send_message(message if isinstance(message, str) else json.dumps(message))

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        with trio.fail_after(timeout):
            data = await self.ws.get_message()
        parsed: dict[str, Any] = json.loads(data)
        return parsed


@asynccontextmanager
async def connect(
    server: Target | int,
    user: str,
    room: str | None = None,
    *,
    joined: bool = True,
    skip: bool = False,
    rcvbuf: int | None = None,
    query: str = "",
    **kw: Any,
) -> AsyncIterator[SocketPeer]:
    """Connect ``user`` over a WebSocket; by default wait for the ``room_joined`` of the URL
    room (with ``skip``, other messages may come first: several instances, Redis).
    ``server``: a ``Target`` or a port on 127.0.0.1.

    The stream is opened and closed here: trio-websocket leaves its stream open when the
    server resets the connection (as it does to an abusive client), which would fail the
    test run with a ResourceWarning. ``rcvbuf`` shrinks the client's receive buffer (to
    make a slow reader without waiting for megabytes of kernel buffers to fill). ``query`` is
    added to the URL (``&v=2``).
    """
    resource = f"/ws?userId={user}" + (f"&room={room}" if room else "") + query
    async with trio.open_nursery() as nursery:
        stream = await tcp(server).open_stream(rcvbuf=rcvbuf)
        try:
            ws = await wrap_client_stream(nursery, stream, "127.0.0.1", resource, **kw)
            try:
                peer = SocketPeer(ws, user)
                if joined:
                    await peer.expect("room_joined", skip=skip)
                yield peer
            finally:
                await ws.aclose()
        finally:
            await stream.aclose()
