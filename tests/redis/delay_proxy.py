"""A TCP proxy between the server and a real redis-server that can hold back what passes.

Each direction of each connection is a FIFO: a chunk read at time ``t`` is forwarded at
``t + delay`` (the delay in force when it was read), never before the chunk ahead of it, so
order is kept whatever the delays do. Connections are told apart by what the server sends:
one that has sent SUBSCRIBE (or SSUBSCRIBE) is the bus's subscription (``pubsub``), any
other carries commands (``commands``). The test switches the delays on and off at will.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

_SUBSCRIBE = (b"\r\nSUBSCRIBE\r\n", b"\r\nSSUBSCRIBE\r\n")


@attrs.define
class Delays:
    """Seconds to hold back what goes to Redis (requests) and what comes back (replies)."""

    to_redis: float = 0.0
    to_client: float = 0.0


@attrs.define
class DelayProxy:
    """The proxy's address and its delays (change them at any time)."""

    port: int = 0
    commands: Delays = attrs.Factory(Delays)
    pubsub: Delays = attrs.Factory(Delays)
    connections: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def set(self, *, commands: Delays | None = None, pubsub: Delays | None = None) -> None:
        self.commands = commands or Delays()
        self.pubsub = pubsub or Delays()


@asynccontextmanager
async def open_delay_proxy(redis_port: int) -> AsyncIterator[DelayProxy]:
    """A running proxy to ``127.0.0.1:redis_port`` on a free port; stopped on exit."""
    proxy = DelayProxy()

    async def handle(client: trio.SocketStream) -> None:
        proxy.connections += 1
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", redis_port)
        except OSError:
            await client.aclose()
            return
        link = _Link(proxy)
        async with client, upstream, trio.open_nursery() as nursery:
            link.scope = nursery.cancel_scope
            nursery.start_soon(link.pump, client, upstream, True)
            nursery.start_soon(link.pump, upstream, client, False)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handle, 0)
        proxy.port = listeners[0].socket.getsockname()[1]
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


class _Link:
    """One proxied connection: two pumps; either side closing ends both."""

    def __init__(self, proxy: DelayProxy) -> None:
        self.proxy = proxy
        self.is_pubsub = False
        self.scope = trio.CancelScope()

    def delay(self, to_redis: bool) -> float:
        delays = self.proxy.pubsub if self.is_pubsub else self.proxy.commands
        return delays.to_redis if to_redis else delays.to_client

    async def pump(self, source: trio.SocketStream, sink: trio.SocketStream, to_redis: bool) -> None:
        send, receive = trio.open_memory_channel[tuple[float, bytes]](math.inf)

        async def forward() -> None:
            with receive:
                async for due, chunk in receive:
                    await trio.sleep_until(due)  # the delay being simulated, not synchronisation
                    await sink.send_all(chunk)

        # A peer that goes away (a server killed with SIGKILL resets its connections) ends
        # the link; the nursery wraps the error in a group.
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(forward)
                with send:
                    while chunk := await source.receive_some(65536):
                        if to_redis and not self.is_pubsub and any(s in chunk for s in _SUBSCRIBE):
                            self.is_pubsub = True
                        send.send_nowait((trio.current_time() + self.delay(to_redis), chunk))
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.scope.cancel()
