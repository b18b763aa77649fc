"""A WebSocket test client for tests that talk JSON to one or more servers by port: it
skips messages it was not asked for (``expect``) or insists on the next one (``next_is``).
The Redis and scale-out suites use it; ``support.Peer`` is the in-process suites' stricter
client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio
import trio_websocket

TIMEOUT = 10.0


class Client:
    """A WebSocket test client that keeps what it receives."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, user: str, port: int) -> None:
        self.ws = ws
        self.user = user
        self.port = port

    async def send(self, **message: Any) -> None:
        await self.ws.send_message(orjson.dumps(message).decode())

    async def receive(self) -> dict[str, Any]:
        with trio.fail_after(TIMEOUT):
            message: dict[str, Any] = orjson.loads(await self.ws.get_message())
        return message

    async def expect(self, kind: str) -> dict[str, Any]:
        """The next message of type ``kind`` (others are skipped)."""
        while True:
            message = await self.receive()
            if message["type"] == kind:
                return message

    async def next_is(self, kind: str) -> dict[str, Any]:
        """The next message, which must be of type ``kind``."""
        message = await self.receive()
        assert kind == message["type"], message
        return message

    async def request(self, reply: str, **message: Any) -> dict[str, Any]:
        await self.send(**message)
        return await self.expect(reply)

    async def sync(self) -> None:
        """Round trip: everything this client's earlier messages caused here has arrived."""
        await self.request("pong", type="ping")


@asynccontextmanager
async def connect(
    port: int, user: str, room: str | None = None, *, joined: bool = True
) -> AsyncIterator[Client]:
    """A connected client, after its ``room_joined`` for the URL room. The TCP stream is
    owned here: trio-websocket leaves it open when the server closes first (4001)."""
    resource = f"/ws?userId={user}" + (f"&room={room}" if room else "")
    async with trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            ws = await trio_websocket.wrap_client_stream(nursery, stream, "127.0.0.1", resource)
            try:
                client = Client(ws, user, port)
                if joined:
                    await client.expect("room_joined")
                yield client
            finally:
                await ws.aclose()
        finally:
            await stream.aclose()
