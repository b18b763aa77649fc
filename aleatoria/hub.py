"""The hub: who is connected to this process, and the rooms that deliver to them.

How this works. Each connected user has one ``Client`` (its WebSocket and its rooms). Each
room with local members has one broadcaster task fed by a bounded memory channel of ready
frames: a broadcast is one channel hop, then the broadcaster hands the same frame bytes to
every member's ``WebSocket.send_now`` (written at once, never awaits a client). One task per room
gives every member the same order. A room with no local members is forgotten: its channel
closes and its broadcaster finishes what was queued, then exits.

Replacing a connection (same userId again) moves the user's rooms to the new WebSocket, so
the user's state carries over; the old socket is closed with 4001.

Scale-out (Redis mode): the hub is given the bus's room channels when it is opened, and
subscribes a room's channel on its first local member and unsubscribes it after its last
(``RoomChannels``); room messages arrive from Redis in batches that ``broadcast_now`` hands
to the members at once, in the order Redis gave them (the broadcaster tasks then only serve
local delivery while Redis is down). ``evict`` drops a user who connected to another
instance.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Protocol

import attrs
import trio

from aleatoria import messages as m
from aleatoria.connection import WebSocket
from aleatoria.frames import REPLACED
from aleatoria.limits import RateLimiter, TokenBucket
from aleatoria.metrics import Stats

log = logging.getLogger("aleatoria.hub")

ROOM_QUEUE_FRAMES = 1024
_BATCH_FRAMES = 64
_BATCH_BYTES = 256 * 1024
# Frames written at once rather than with the flusher's next burst. A match announcement
# goes to a user who may be about to ask again (after no_peer_available): each moment it
# waits widens the window in which that request crosses it and is answered with a re-sent
# assign_role (PROTOCOL.md). Measured, 200 users: 47-81 re-sends per 4 s -> 2-5.
_AT_ONCE = frozenset({m.ASSIGN_ROLE})


class RoomChannels(Protocol):
    """Where a room's messages come from when they cross instances (the Redis bus): told of
    the first local member of a room and of its last."""

    def subscribe_room(self, room: str) -> None: ...

    def unsubscribe_room(self, room: str) -> None: ...


@attrs.define(eq=False)
class Client:
    """One connected user on this process."""

    user: str
    ws: WebSocket
    limiter: RateLimiter
    rooms: set[str] = attrs.Factory(set)
    replaced: bool = False
    connection: str = ""  # unique per connection (presence tells connections apart)
    # With auth on: when the token runs out (trio clock); the supervisor closes with 4002.
    expires_at: float | None = None
    # DM partners this user wrote to within the hour -> when first (new_dm_per_hour): a cache
    # of the store's count, which is per user (it outlives the connection).
    dm_partners: dict[str, float] | None = None  # made on the first DM
    # Safety (PROTOCOL.md section 13): who blocked this user (loaded at the handshake, kept
    # current by the router's notices) and whether it is shadow-banned.
    blocked_by: frozenset[str] | set[str] = frozenset()  # a set once someone blocks it
    # Whom this connection blocked: an ``assign_role`` with one of them that another instance
    # sends later is for a match the block ended (made a moment before it), so it is dropped.
    blocking: frozenset[str] | set[str] = frozenset()  # a set once it blocks someone
    shadow: bool = False
    # The last search match announced to it from another instance (delivered once).
    announced: str = ""
    # Opened with ``v=2`` (PROTOCOL.md section 11): hears presence events and ``typing``.
    level2: bool = False


class Room:
    """The local members of one room and the channel into its broadcaster."""

    def __init__(self, name: str, send: trio.MemorySendChannel[bytes]) -> None:
        self.name = name
        self.members: dict[str, WebSocket] = {}
        self.level2: set[str] = set()  # the members that hear presence events and typing
        self.send = send


class Hub:
    """Local connections and rooms. Create it with ``open_hub``."""

    def __init__(
        self, nursery: trio.Nursery, linger: float = 0.0, channels: RoomChannels | None = None
    ) -> None:
        self._nursery = nursery
        self._linger = linger
        self._channels = channels
        self.stats = Stats()
        # Each user's budget of peer requests (``core.Facts.match_budgets``), kept across its
        # connections; one full again is forgotten (``limits.forget_full``, the supervisor).
        self.match_budgets: dict[str, TokenBucket] = {}
        self.clients: dict[str, Client] = {}
        self.rooms: dict[str, Room] = {}
        self.max_rooms = sys.maxsize  # rooms with local members at once (``may_open``)
        self.broadcasts = 0
        self.deliveries = 0

    # -- connections --------------------------------------------------------------------

    def attach(self, client: Client) -> Client | None:
        """Register ``client``; a previous connection of the same user is replaced (its rooms
        move over, it is closed with 4001) and returned."""
        old = self.clients.get(client.user)
        self.clients[client.user] = client
        if old is None:
            return None
        old.replaced = True
        client.rooms = old.rooms
        old.rooms = set()
        client.dm_partners = old.dm_partners
        for name in client.rooms:
            room = self.rooms[name]
            room.members[client.user] = client.ws
            if client.level2:
                room.level2.add(client.user)
            else:
                room.level2.discard(client.user)
        old.ws.close(REPLACED, "replaced")
        return old

    def evict(self, user: str, connection: str) -> Client | None:
        """``user`` connected to another instance: close its connection ``connection`` here
        with 4001 and forget it (rooms included) without touching shared state (the new
        instance took it over). Returns the client, or None if that connection is not here."""
        client = self.clients.get(user)
        if client is None or client.connection != connection:
            return None
        client.replaced = True
        del self.clients[user]
        for name in sorted(client.rooms):
            self._leave(name, client)
        client.rooms = set()
        client.ws.close(REPLACED, "replaced")
        return client

    def detach(self, client: Client) -> list[str]:
        """Forget ``client`` unless it was replaced; returns the rooms it left."""
        if self.clients.get(client.user) is not client:
            return []
        del self.clients[client.user]
        left = sorted(client.rooms)
        for name in left:
            self._leave(name, client)
        client.rooms.clear()
        return left

    def swap_socket(self, client: Client, ws: WebSocket) -> None:
        """Frames for ``client`` go to ``ws`` from now on (its rooms' member lists too): a
        dropped level-2 session's kept outbox (PROTOCOL.md section 15)."""
        client.ws = ws
        for name in client.rooms:
            room = self.rooms.get(name)
            if room is not None and client.user in room.members:
                room.members[client.user] = ws

    def is_online(self, user: str) -> bool:
        return user in self.clients

    def deliver(self, user: str, frame: bytes, kind: str) -> bool:
        """Send one frame (a message of type ``kind``) to ``user`` if connected here; False
        if not."""
        client = self.clients.get(user)
        if client is None:
            return False
        client.ws.send(frame)
        if kind in _AT_ONCE:
            client.ws.flush()
        self.deliveries += 1
        self.stats.messages_out[kind] += 1
        return True

    # -- rooms -------------------------------------------------------------------------------

    def may_open(self, name: str) -> bool:
        """Whether a member may join room ``name`` here: it has local members already, or
        there are fewer than ``max_rooms`` rooms."""
        return name in self.rooms or len(self.rooms) < self.max_rooms

    def join(self, client: Client, name: str) -> None:
        """Add ``client`` to room ``name``. A replaced client joins nothing: its socket must
        never stand in a member list in place of its successor's."""
        if client.replaced:
            return
        room = self.rooms.get(name)
        if room is None:
            send, receive = trio.open_memory_channel[bytes](ROOM_QUEUE_FRAMES)
            room = self.rooms[name] = Room(name, send)
            self._nursery.start_soon(self._broadcaster, room, receive, name=f"room:{name}")
            if self._channels is not None:
                self._channels.subscribe_room(name)
        room.members[client.user] = client.ws
        if client.level2:
            room.level2.add(client.user)
        client.rooms.add(name)

    def leave(self, client: Client, name: str) -> None:
        if name in client.rooms:
            client.rooms.discard(name)
            self._leave(name, client)

    def _leave(self, name: str, client: Client) -> None:
        room = self.rooms.get(name)
        if room is None:
            return
        room.members.pop(client.user, None)
        room.level2.discard(client.user)
        if not room.members:
            del self.rooms[name]
            room.send.close()
            if self._channels is not None:
                self._channels.unsubscribe_room(name)

    async def broadcast(self, name: str, frame: bytes) -> None:
        """Queue ``frame`` for every local member of room ``name`` (in order). Waits only when
        the room's queue is full, which slows the sender, never the other members."""
        room = self.rooms.get(name)
        if room is None:
            return
        try:
            # Without a checkpoint while there is room in the queue: ``send`` would cost the
            # sender a trip through trio's scheduler on every message, and the connection
            # checkpoints anyway when it next waits for its socket.
            room.send.send_nowait(frame)
        except trio.WouldBlock:
            await room.send.send(frame)

    def broadcast_now(self, name: str, frames: list[bytes], exclude: str | None = None) -> None:
        """Send ``frames`` (in order) to every local member of room ``name`` now -- but user
        ``exclude`` -- joined into as few sends as the broadcaster would make. Never blocks."""
        room = self.rooms.get(name)
        if room is None:
            return
        if exclude is None:
            self._fan_out(room.members.values(), frames)
        else:
            self._fan_out([ws for user, ws in room.members.items() if user != exclude], frames)

    def _fan_out(self, members: Iterable[WebSocket], frames: list[bytes]) -> bool:
        """The one batching of room frames: ``frames`` go, in order, to each member, joined
        into sends of at most ``_BATCH_FRAMES`` frames and ``_BATCH_BYTES`` (joining is what
        makes fan-out cheap: system calls dominate its cost). True if a send was full."""
        members = tuple(members)
        total = len(frames)
        full = False
        start = 0
        while start < total:
            end = start
            size = 0
            while end < total and end - start < _BATCH_FRAMES and size < _BATCH_BYTES:
                size += len(frames[end])
                end += 1
            count = end - start
            data = frames[start] if count == 1 else b"".join(frames[start:end])
            for ws in members:
                ws.send_now(data, count)
            full = full or count == _BATCH_FRAMES or size >= _BATCH_BYTES
            start = end
        self.broadcasts += total
        self.deliveries += total * len(members)
        self.stats.messages_out["chat_message"] += total * len(members)
        return full

    async def _broadcaster(self, room: Room, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        linger = 0.0  # how long this frame waits for company; see below
        with receive:
            while True:
                try:
                    frame = await receive.receive()
                except trio.EndOfChannel:
                    return
                if linger:
                    await trio.sleep(linger)
                batch = [frame]
                while len(batch) < _BATCH_FRAMES:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                full = self._fan_out(room.members.values(), batch)
                # When this batch found company (several senders at once), the next frame
                # waits ``self._linger`` for more; a lone message goes out at once, so quiet
                # rooms and ping-pong pay no delay, and after a full batch the rest of the
                # queue follows at once.
                # Measured on 1 x 500 members: 7.7 -> 2.7-3.5 us of CPU per delivery at 1 ms.
                linger = self._linger if len(batch) > 1 and not full else 0.0

    # -- shutdown ----------------------------------------------------------------------------

    def close_all(self, code: int, reason: str) -> None:
        for client in list(self.clients.values()):
            client.ws.close(code, reason)


@asynccontextmanager
async def open_hub(linger: float = 0.0, channels: RoomChannels | None = None) -> AsyncIterator[Hub]:
    """A hub whose broadcaster tasks live in a nursery owned here. On exit the broadcasters
    are cancelled. ``linger``: see ``Hub._broadcaster`` (seconds; 0 sends every frame at
    once). ``channels``: the store's bus in Redis mode (``store.bus``), so rooms with local
    members are subscribed; None in memory mode."""
    async with trio.open_nursery() as nursery:
        hub = Hub(nursery, linger, channels)
        try:
            yield hub
        finally:
            nursery.cancel_scope.cancel()
