"""Test support: a real server on port 0 and real WebSocket clients over TCP."""

from __future__ import annotations

import abc
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

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


@attrs.define
class RunningServer:
    port: int
    config: Config
    scope: trio.CancelScope

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def running_server(**overrides: Any) -> AsyncIterator[RunningServer]:
    """Start ``serve`` in-process on port 0; stop it (gracefully) on exit."""
    config = make_config(**overrides)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, config)
        yield RunningServer(port, config, nursery.cancel_scope)
        nursery.cancel_scope.cancel()


def close_of(exc: ConnectionClosed) -> tuple[int, str]:
    """The close code and reason a client saw (1006 when the connection just broke)."""
    reason = exc.reason
    return (1006, "") if reason is None else (reason.code, reason.reason or "")


class Exchanges(abc.ABC):
    """``expect`` and ``request`` over a client's ``send`` and ``recv``: one protocol-level
    API for the socket tier (``Peer``) and the in-memory tier (``inmemory.FakePeer``)."""

    @abc.abstractmethod
    async def send(self, message: dict[str, Any] | str) -> None: ...

    @abc.abstractmethod
    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]: ...

    async def expect(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next message, which must be of type ``kind``."""
        message = await self.recv(timeout)
        assert kind == message["type"], message
        return message

    async def request(self, message: dict[str, Any], reply: str) -> dict[str, Any]:
        await self.send(message)
        return await self.expect(reply)


class Peer(Exchanges):
    """A test client: a trio-websocket connection plus JSON helpers."""

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
    server: RunningServer,
    user: str,
    room: str | None = None,
    *,
    joined: bool = True,
    rcvbuf: int | None = None,
    **kw: Any,
) -> AsyncIterator[Peer]:
    """Connect ``user``; by default wait for the ``room_joined`` of the URL room.

    The TCP stream is opened and closed here: trio-websocket leaves its stream open when the
    server resets the connection (as it does to an abusive client), which would fail the
    test run with a ResourceWarning. ``rcvbuf`` shrinks the client's receive buffer (to
    make a slow reader without waiting for megabytes of kernel buffers to fill).
    """
    resource = f"/ws?userId={user}" + (f"&room={room}" if room else "")
    async with trio.open_nursery() as nursery:
        sock = trio.socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, rcvbuf)
        try:
            await sock.connect(("127.0.0.1", server.port))
        except BaseException:
            sock.close()
            raise
        stream = trio.SocketStream(sock)
        try:
            ws = await wrap_client_stream(nursery, stream, "127.0.0.1", resource, **kw)
            try:
                peer = Peer(ws, user)
                if joined:
                    await peer.expect("room_joined")
                yield peer
            finally:
                await ws.aclose()
        finally:
            await stream.aclose()
