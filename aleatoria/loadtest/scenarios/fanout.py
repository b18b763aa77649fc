"""``fanout``: R rooms × M members, S of them sending, each with an in-flight window.

Every member joins its room (explicit ``join_room`` answered by ``room_joined``, so the
membership is in place before anyone sends), and every message a sender sends must
reach every member, the sender included, exactly once and in the sender's order.
Figures: ``room.sent``, ``room.delivered`` (unique deliveries), ``room.expected``,
``room.lost``, ``room.duplicated``, ``room.reordered``, ``room.refused`` (answered
``rate_limited``), ``room.window_timeouts``, ``room.foreign`` (chat that was not ours)
and the latency ``room.delivery`` (send → each member's receipt).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import trio
from trio_websocket import WebSocketConnection

from aleatoria.loadtest.client import Message, note_error, receive, run_client, send, wait_for
from aleatoria.loadtest.context import Ready, RunContext, run_clients
from aleatoria.loadtest.flow import Pacer, Pending, Window
from aleatoria.loadtest.payload import decode, encode, now_ns
from aleatoria.loadtest.tracking import Arrival, SequenceTracker


class Sender:
    def __init__(self, window: Window, pacer: Pacer) -> None:
        self.window = window
        self.pacer = pacer
        self.refused = 0


class Room:
    def __init__(self, name: str, members: list[str]) -> None:
        self.name = name
        self.members = members
        self.joined: dict[str, dict[str, SequenceTracker]] = {}  # member -> sender -> tracker
        self.senders: dict[str, Sender] = {}


class FanoutPart:
    """The rooms this worker owns; see the module docstring."""

    def __init__(self, ctx: RunContext) -> None:
        opts = ctx.options
        self.ctx = ctx
        self.rooms = [
            Room(ctx.user_id("room", r), [ctx.user_id("r", r, "m", m) for m in range(opts.members)])
            for r in ctx.share(opts.rooms)
        ]
        self.ready = Ready(sum(len(room.members) for room in self.rooms))
        self.closing = trio.Event()
        self.pending = Pending()  # deliveries expected but not seen yet
        total_senders = opts.rooms * opts.senders
        self.interval = total_senders / opts.rate if opts.rate > 0 else 0.0

    async def run(self) -> None:
        clients = [
            functools.partial(self._member, room, user, index < self.ctx.options.senders)
            for room in self.rooms
            for index, user in enumerate(room.members)
        ]
        await run_clients(clients, self.closing)

    async def drained(self) -> None:
        await self.pending.drained()

    def close(self) -> None:
        self.closing.set()

    async def _member(self, room: Room, user: str, is_sender: bool) -> None:
        arrive = self.ready.token()
        try:
            session = functools.partial(self._session, room, user, is_sender, arrive)
            await run_client(self.ctx, user, room.name, session)
        finally:
            arrive()

    async def _session(
        self,
        room: Room,
        user: str,
        is_sender: bool,
        arrive: Callable[[], None],
        ws: WebSocketConnection,
    ) -> None:
        ctx = self.ctx
        await send(ws, {"type": "join_room", "room": room.name})
        with trio.move_on_after(ctx.options.connect_timeout) as scope:
            await wait_for(ws, ctx, lambda m: m.get("type") == "room_joined" and m.get("room") == room.name)
        if scope.cancelled_caught:
            ctx.stats.inc("conn.join_timeout")
            return
        trackers = room.joined[user] = {}
        sender: Sender | None = None
        if is_sender:
            phase = ctx.rng.random()
            window = Window(ctx.options.window, ctx.options.inflight_timeout)
            sender = room.senders[user] = Sender(window, Pacer(self.interval, phase))
            ctx.on_stop(sender.window.wake)
        arrive()
        await ctx.go.wait()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reader, ws, room, user, trackers, sender)
            if sender is not None:
                nursery.start_soon(self._sender, ws, room, sender)
            await self.closing.wait()
            nursery.cancel_scope.cancel()

    async def _sender(self, ws: WebSocketConnection, room: Room, sender: Sender) -> None:
        ctx = self.ctx
        size = ctx.options.size
        while await sender.window.wait_open(ctx.stop):
            if not await sender.pacer.wait_turn(ctx.stop):
                break
            seq = sender.window.take()
            # Counted before the await: the echo may be processed before send returns.
            ctx.stats.inc("room.sent")
            self.pending.expect(len(room.joined))
            content = encode(seq, now_ns(), size)
            await send(ws, {"type": "chat_message", "room": room.name, "payload": {"content": content}})

    async def _reader(
        self,
        ws: WebSocketConnection,
        room: Room,
        user: str,
        trackers: dict[str, SequenceTracker],
        sender: Sender | None,
    ) -> None:
        stats = self.ctx.stats
        while True:
            message = await receive(ws)
            if message.get("type") != "chat_message":
                if note_error(self.ctx, message) == "rate_limited" and sender is not None:
                    sender.refused += 1
                    sender.window.forget_one()
                    stats.inc("room.refused")
                    self.pending.settle(len(room.joined))
                continue
            self._delivery(message, room, user, trackers, sender)

    def _delivery(
        self,
        message: Message,
        room: Room,
        user: str,
        trackers: dict[str, SequenceTracker],
        sender: Sender | None,
    ) -> None:
        stats = self.ctx.stats
        payload = message.get("payload")
        stamp = decode(payload.get("content") if isinstance(payload, dict) else None)
        origin = message.get("fromUser")
        if stamp is None or message.get("room") != room.name or not isinstance(origin, str):
            stats.inc("room.foreign")
            return
        at = now_ns()
        tracker = trackers.get(origin)
        if tracker is None:
            tracker = trackers[origin] = SequenceTracker()
        arrival = tracker.observe(stamp.seq)
        if arrival is Arrival.DUPLICATE:
            stats.inc("room.duplicated")
            return
        if arrival is Arrival.LATE:
            stats.inc("room.reordered")
        stats.inc("room.delivered")
        stats.observe("room.delivery", at - stamp.sent_ns, at)
        self.pending.settle()
        if origin == user and sender is not None:
            sender.window.confirm(stamp.seq)

    def account(self) -> None:
        stats = self.ctx.stats
        for room in self.rooms:
            for origin, sender in room.senders.items():
                accepted = sender.window.next_seq - sender.refused
                stats.inc("room.window_timeouts", sender.window.timeouts)
                stats.inc("room.pacer_skipped", sender.pacer.skipped)
                for trackers in room.joined.values():
                    stats.inc("room.expected", accepted)
                    tracker = trackers.get(origin)
                    stats.inc("room.lost", tracker.missing(accepted) if tracker else accepted)
