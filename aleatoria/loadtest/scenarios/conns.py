"""``conns``: open N idle connections, hold them for ``duration``, check, close.

The load phase is the hold: connections stay open and silent (trio-websocket answers
the server's WebSocket pings in the background). At the end of the hold every
connection sends one application ``ping``; ``conn.alive`` counts the ``pong``s that came
back within ``drain_timeout``, ``conn.unresponsive`` the ones that did not, and
``conn.ping`` is that round trip's latency. With ``--server-pid`` the report adds the
server's memory per open connection. ``connect`` is the handshake latency.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import trio
from trio_websocket import WebSocketConnection

from aleatoria.loadtest.client import run_client, send, wait_for
from aleatoria.loadtest.context import Ready, RunContext, run_clients
from aleatoria.loadtest.payload import now_ns


class ConnsPart:
    """The idle connections this worker owns."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.names = [ctx.user_id("c", c) for c in ctx.share(ctx.options.connections)]
        self.ready = Ready(len(self.names))
        self.checked = Ready(len(self.names))
        self.check = trio.Event()
        self.closing = trio.Event()

    async def run(self) -> None:
        await run_clients([functools.partial(self._client, n) for n in self.names], self.closing)

    async def drained(self) -> None:
        self.check.set()
        await self.checked.wait()

    def close(self) -> None:
        self.closing.set()

    def account(self) -> None:
        """Nothing to add: every figure is counted as it happens."""

    async def _client(self, name: str) -> None:
        arrive = self.ready.token()
        checked = self.checked.token()
        try:
            await run_client(self.ctx, name, None, functools.partial(self._session, arrive, checked))
        finally:
            arrive()
            checked()

    async def _session(
        self, arrive: Callable[[], None], checked: Callable[[], None], ws: WebSocketConnection
    ) -> None:
        ctx = self.ctx
        arrive()
        await self.check.wait()
        started = now_ns()
        await send(ws, {"type": "ping"})
        with trio.move_on_after(ctx.options.drain_timeout) as scope:
            await wait_for(ws, ctx, lambda m: m.get("type") == "pong")
        if scope.cancelled_caught:
            ctx.stats.inc("conn.unresponsive")
        else:
            done = now_ns()
            ctx.stats.inc("conn.alive")
            ctx.stats.observe("conn.ping", done - started, done)
        checked()
        await self.closing.wait()
