"""``dm``: P pairs play ping-pong with direct messages.

In pair i, A sends B a numbered DM (up to ``dm_window`` unanswered at once); B answers
each with a DM carrying the same number and send time, and A measures the round trip.
The protocol also hands each sender a copy of its own DM (``incoming: false``), so
every ping produces four deliveries — B's, A's copy, A's reply, B's copy — and each of
the four streams is checked for loss, duplicates and order.
Figures: ``dm.sent`` (pings), ``dm.replies``, ``dm.delivered``, ``dm.expected``,
``dm.lost``, ``dm.duplicated``, ``dm.reordered``, ``dm.refused`` (``rate_limited``),
``dm.bad_incoming_flag`` (``incoming`` missing or wrong), ``dm.window_timeouts``,
``dm.foreign``; latencies ``dm.rtt`` (A → B → A) and ``dm.oneway`` (A → B).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import trio
from trio_websocket import WebSocketConnection

from aleatoria.loadtest.client import Message, note_error, receive, registered, run_client, send
from aleatoria.loadtest.context import Ready, RunContext, run_clients
from aleatoria.loadtest.flow import Pacer, Pending, Window
from aleatoria.loadtest.payload import decode, encode, now_ns
from aleatoria.loadtest.tracking import Arrival, SequenceTracker


class Side:
    """One end of a pair: what it sent and what it saw."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent = 0  # pings (A) or replies (B)
        self.refused = 0
        self.from_peer = SequenceTracker()
        self.copies = SequenceTracker()
        self.joined = False


class Pair:
    def __init__(self, a: str, b: str, window: Window, pacer: Pacer) -> None:
        self.a = Side(a)
        self.b = Side(b)
        self.window = window
        self.pacer = pacer


class DmPart:
    """The pairs this worker owns; see the module docstring."""

    def __init__(self, ctx: RunContext) -> None:
        opts = ctx.options
        self.ctx = ctx
        interval = opts.pairs / opts.dm_rate if opts.dm_rate > 0 else 0.0
        self.pairs = [
            Pair(
                ctx.user_id("p", p, "a"),
                ctx.user_id("p", p, "b"),
                Window(opts.dm_window, opts.inflight_timeout),
                Pacer(interval, ctx.rng.random()),
            )
            for p in ctx.share(opts.pairs)
        ]
        self.ready = Ready(2 * len(self.pairs))
        self.closing = trio.Event()
        self.pending = Pending()  # deliveries expected but not seen yet

    async def run(self) -> None:
        clients = []
        for pair in self.pairs:
            self.ctx.on_stop(pair.window.wake)
            clients.append(functools.partial(self._client, pair, pair.a, pair.b, True))
            clients.append(functools.partial(self._client, pair, pair.b, pair.a, False))
        await run_clients(clients, self.closing)

    async def drained(self) -> None:
        await self.pending.drained()

    def close(self) -> None:
        self.closing.set()

    async def _client(self, pair: Pair, me: Side, peer: Side, pinger: bool) -> None:
        arrive = self.ready.token()
        try:
            session = functools.partial(self._session, pair, me, peer, pinger, arrive)
            await run_client(self.ctx, me.name, None, session)
        finally:
            arrive()

    async def _session(
        self,
        pair: Pair,
        me: Side,
        peer: Side,
        pinger: bool,
        arrive: Callable[[], None],
        ws: WebSocketConnection,
    ) -> None:
        ctx = self.ctx
        if not await registered(ws, ctx):
            return
        me.joined = True
        arrive()
        await ctx.go.wait()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reader, ws, pair, me, peer, pinger)
            if pinger:
                nursery.start_soon(self._pinger, ws, pair)
            await self.closing.wait()
            nursery.cancel_scope.cancel()

    async def _pinger(self, ws: WebSocketConnection, pair: Pair) -> None:
        ctx = self.ctx
        while await pair.window.wait_open(ctx.stop):
            if not await pair.pacer.wait_turn(ctx.stop):
                break
            seq = pair.window.take()
            pair.a.sent += 1
            ctx.stats.inc("dm.sent")
            self.pending.expect(2)  # B's delivery and A's copy
            content = encode(seq, now_ns(), ctx.options.size)
            await send(ws, _dm(pair.b.name, content))

    async def _reader(self, ws: WebSocketConnection, pair: Pair, me: Side, peer: Side, pinger: bool) -> None:
        ctx = self.ctx
        while True:
            message = await receive(ws)
            if message.get("type") != "chat_message":
                if note_error(ctx, message) == "rate_limited":
                    me.refused += 1
                    ctx.stats.inc("dm.refused")
                    self.pending.settle(2)
                    if pinger:
                        pair.window.forget_one()
                continue
            reply = self._delivery(message, pair, me, peer, pinger)
            if reply is not None:
                await send(ws, _dm(peer.name, reply))

    def _delivery(self, message: Message, pair: Pair, me: Side, peer: Side, pinger: bool) -> str | None:
        """Account one DM; return the content to answer with, if any."""
        stats = self.ctx.stats
        payload = message.get("payload")
        content = payload.get("content") if isinstance(payload, dict) else None
        stamp = decode(content)
        origin = message.get("fromUser")
        if stamp is None or not isinstance(content, str) or origin not in {me.name, peer.name}:
            stats.inc("dm.foreign")
            return None
        at = now_ns()
        is_copy = origin == me.name
        if message.get("incoming") is not (not is_copy):
            stats.inc("dm.bad_incoming_flag")
        tracker = me.copies if is_copy else me.from_peer
        arrival = tracker.observe(stamp.seq)
        if arrival is Arrival.DUPLICATE:
            stats.inc("dm.duplicated")
            return None
        if arrival is Arrival.LATE:
            stats.inc("dm.reordered")
        stats.inc("dm.delivered")
        answering = not is_copy and not pinger
        if answering:
            # Count the answer's two deliveries (A's and B's copy) *before* settling this
            # one: otherwise the drain could see nothing pending in between and end
            # while the answer is still on its way.
            me.sent += 1
            stats.inc("dm.replies")
            self.pending.expect(2)
        self.pending.settle()
        if is_copy:
            return None
        if pinger:
            stats.observe("dm.rtt", at - stamp.sent_ns, at)
            pair.window.confirm(stamp.seq)
            return None
        stats.observe("dm.oneway", at - stamp.sent_ns, at)
        return content  # B answers with A's number and send time

    def account(self) -> None:
        stats = self.ctx.stats
        for pair in self.pairs:
            stats.inc("dm.window_timeouts", pair.window.timeouts)
            stats.inc("dm.pacer_skipped", pair.pacer.skipped)
            a_ok = pair.a.sent - pair.a.refused
            b_ok = pair.b.sent - pair.b.refused
            streams = [
                (pair.b.from_peer, a_ok, pair.b.joined),
                (pair.a.copies, a_ok, pair.a.joined),
                (pair.a.from_peer, b_ok, pair.a.joined),
                (pair.b.copies, b_ok, pair.b.joined),
            ]
            for tracker, accepted, joined in streams:
                if joined:
                    stats.inc("dm.expected", accepted)
                    stats.inc("dm.lost", tracker.missing(accepted))


def _dm(to_user: str, content: str) -> Message:
    return {"type": "chat_message", "toUser": to_user, "payload": {"content": content}}
