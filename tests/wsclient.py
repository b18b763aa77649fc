"""Deprecated: the old by-port client's vocabulary (``send(**fields)``, ``receive``,
``request(reply, **fields)``), kept only for tests/scaleout/test_search_storm.py, whose
owner changes it in parallel. Everything else uses ``support.connect`` and the ``Peer``
vocabulary; migrate that test to it and delete this file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from support import SocketPeer
from support import connect as connect_peer


class Client:
    """The old names over a ``support.SocketPeer``."""

    def __init__(self, peer: SocketPeer) -> None:
        self.peer = peer
        self.user = peer.user

    async def send(self, **message: Any) -> None:
        await self.peer.send(message)

    async def receive(self) -> dict[str, Any]:
        return await self.peer.recv()

    async def request(self, reply: str, **message: Any) -> dict[str, Any]:
        return await self.peer.request(message, reply, skip=True)

    async def sync(self) -> None:
        await self.peer.sync()


@asynccontextmanager
async def connect(
    port: int, user: str, room: str | None = None, *, joined: bool = True
) -> AsyncIterator[Client]:
    async with connect_peer(port, user, room, joined=joined, skip=True) as peer:
        yield Client(peer)
