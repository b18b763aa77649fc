"""Delivery to users and rooms, on this instance or any other (PROTOCOL.md section 9).

How this works. The router sits between the sessions and the hub. Without a bus (memory
store) it is the hub: local delivery, nothing else. With the Redis bus:
- A frame for one user goes straight to the local socket when the user is connected here
  (no thread hop, no Redis); otherwise it is routed through Redis to the user's instance
  (presence lookup and publish in one script). Relayed signaling waits for the outcome, so
  ``peer_unavailable`` is still answered when the user is offline everywhere.
- A room message is published on the room's channel and delivered, here too, when it comes
  back from Redis: Redis' order is the one order every member sees, on every instance. The
  message crosses Redis once per subscribed instance, not once per member.
- While the bus is unusable (Redis degraded, subscription down) everything is delivered
  locally only: users on other instances miss room messages and direct frames until Redis
  is back (history has the room messages once the write-behind queue is flushed).
- Messages from other instances arrive in batches from the bus thread
  (``on_bus_messages``, on the trio thread): room frames go to ``Hub.broadcast_now``; user
  frames carry a one-line header (``U<user> <type> [<peer> [<role>]]``) read here, so the
  JSON is never decoded or re-encoded: it is wrapped in a WebSocket frame and sent. Eviction
  notices (``E<user> <connection>``) close a connection the user replaced elsewhere.
- Safety notices (PROTOCOL.md section 13) are routed to a user's instance like its frames:
  ``B<user> <blocker> <1|0>`` (``blocker`` blocks ``user`` now, or no longer),
  ``S<user> <1|0>`` (a shadow ban began or ended), ``K<user>`` (close with 4003: banned or
  kicked). They are best effort like every bus message; a user who connects later reads
  its blocks and ban from the store at the handshake.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from functools import partial

import trio

from aleatoria import messages as m
from aleatoria.codec import encode, now
from aleatoria.frames import BANNED, text_frame
from aleatoria.hub import Client, Hub
from aleatoria.messages import Envelope
from aleatoria.presence import LEVEL2_ITEM, Presence
from aleatoria.store import Store

log = logging.getLogger("aleatoria.router")

_INSTANCE = os.urandom(4).hex()
_counter = itertools.count(1)
_SUBSCRIBE_TIMEOUT = 2.0


def new_message_id() -> str:
    """A unique id: this process's random prefix and a counter (cheaper than uuid4)."""
    return f"{_INSTANCE}-{next(_counter):x}"


def user_envelope(user: str, kind: str, payload: bytes, *extra: str) -> bytes:
    """The bus form of a frame for one user: a header line, then the JSON."""
    head = " ".join((user, kind, *extra))
    return b"U" + head.encode() + b"\n" + payload


class Router:
    """Local-or-remote delivery; the bus's handler and the store's event sink."""

    def __init__(self, hub: Hub, store: Store) -> None:
        self.hub = hub
        self.store = store
        self.bus = store.bus
        self.instance = store.instance
        self.dropped = 0  # frames from the bus for users no longer here
        self.presence = Presence(hub, self.bus)  # level-2 room events (PROTOCOL.md section 11)
        # Resume across instances (resume_remote.py): (asked, answered), set by its owner.
        self.resume_handlers: (
            tuple[Callable[[str, str, str, str], None], Callable[[str, str, bytes], None]] | None
        ) = None
        # What the store and its bus hear is for the router; the store exists before the
        # router (which is built on it), so this is handed over here (``StoreEvents``).
        store.attach(self)

    @property
    def remote(self) -> bool:
        """Deliver through Redis now."""
        return self.bus is not None and self.bus.usable

    # -- rooms ----------------------------------------------------------------------------

    async def room_ready(self, room: str) -> None:
        """Wait until this instance receives room ``room``'s messages (its channel is
        subscribed), so a ``room_joined`` sent after this is followed by every message sent
        after it. Bounded; returns at once without a usable bus."""
        if self.bus is not None and self.remote:
            with trio.move_on_after(_SUBSCRIBE_TIMEOUT):
                await self.bus.room_ready(room)

    async def broadcast(self, room: str, data: bytes, created_ns: int, sender: str) -> None:
        """Store ``data`` (a message JSON created at ``created_ns``) in ``room``'s history
        and deliver it to every member of ``room``, everywhere. ``sender``: the local user
        who sent it. Its own copy is its acknowledgement: in Redis mode it leaves only once
        Redis has the message (PROTOCOL.md section 16), see ``_deliver_here``."""
        bus = self.bus
        store = self.store
        if bus is not None and bus.usable:
            # One script stores it with Redis' time and publishes it (``redis_stamp``): every
            # member, the sender too, gets Redis' copy. If the bus gives up on it first,
            # ``done(None)``: it goes to history with this instance's time, and here only.
            def done(reached: int | None) -> None:
                if reached is None:
                    store.record_room_message(room, data, created_ns)
                    self._deliver_here(room, data, sender)

            bus.send_room(room, data, done)
            return
        store.record_room_message(room, data, created_ns)
        if bus is not None and store.health() == "ok":
            self._deliver_here(room, data, sender)  # Redis answers, but too late for chat
        else:
            # Memory mode, or degraded: memory is the truth.
            await self.hub.broadcast(room, text_frame(data))

    def _deliver_here(self, room: str, data: bytes, sender: str) -> None:
        """A room message the bus cannot carry now (stalled, subscription down) while Redis
        still answers: the local members get it at once, but its sender's copy waits until
        the store has it (a ``kill -9`` must not lose a message its sender saw). The sender
        therefore sees its own message after messages others sent later; everyone else
        sees one order."""
        frame = text_frame(data)
        self.hub.broadcast_now(room, [frame], exclude=sender)
        self.store.after_stored(partial(self._own_copy, sender, frame))

    def _own_copy(self, user: str, frame: bytes) -> None:
        self.hub.deliver(user, frame, m.CHAT_MESSAGE)  # gone meanwhile: nobody to tell

    # -- users ------------------------------------------------------------------------------

    def send(self, user: str, data: bytes, kind: str, *extra: str) -> None:
        """Deliver ``data`` to ``user`` wherever it is connected; nothing if offline."""
        if self.hub.deliver(user, text_frame(data), kind):
            return
        if self.bus is not None and self.remote:
            self.bus.route(user, user_envelope(user, kind, data, *extra))

    def send_level2(self, user: str, data: bytes, kind: str) -> None:
        """``send``, to a level-2 connection only (``typing`` to one user): a level-1 one is
        never sent a type it did not ask for (its instance checks, too)."""
        client = self.hub.clients.get(user)
        if client is not None:
            if client.level2:
                self.hub.deliver(user, text_frame(data), kind)
        elif self.bus is not None and self.remote:
            self.bus.route(user, user_envelope(user, kind, data))

    def send_here(self, user: str, data: bytes, kind: str) -> bool:
        """Deliver ``data`` to ``user`` if it is connected to this instance; whether it was.
        (``send_checked``'s first step, without a coroutine: most signals end here.) The
        frame is made only for a user who is here."""
        if user not in self.hub.clients:
            return False
        return self.hub.deliver(user, text_frame(data), kind)

    async def send_checked(self, user: str, data: bytes, kind: str, *extra: str, sender: str = "") -> bool:
        """``send``, and whether ``user`` is online (here, or on a live instance). Given a
        ``sender``, a user on another instance who is in a live match with someone else
        counts as offline (the Redis route checks: calls are not hijacked)."""
        if self.send_here(user, data, kind):
            return True
        if self.bus is None or not self.remote:
            return False
        reached = await self.bus.route_wait(user, user_envelope(user, kind, data, *extra), sender)
        return reached is not None and reached > 0

    async def send_surely(
        self, user: str, data: bytes, kind: str, *extra: str, window: float = 3.0, pause: float = 0.25
    ) -> bool:
        """``send``, for a frame that must not be lost to a passing bus outage (the search
        queue's ``assign_role``: nobody else will tell the user): while the bus cannot carry
        it (stalled, Redis failing, or the user's instance not subscribed at that moment), try
        again every ``pause`` seconds for ``window`` seconds. Whether it was handed over.

        Each attempt waits for Redis' answer (a stall does not cut it short: ``route_wait``'s
        ``patient``), so a frame Redis published is not sent again. A frame sent again after
        a failed pipeline may still arrive twice (the same ``assign_role``, which clients take
        as a repeat). A user offline everywhere is not waited for: its session is over (its
        match ended and its search left with it), and a later connection is another session,
        which the frame must not reach (issue 14: a new search answered by an old match or
        timeout)."""
        attempts = max(1, math.ceil(window / pause) + 1)
        for attempt in range(attempts):
            if self.send_here(user, data, kind):
                return True
            if self.bus is None:
                return False  # one instance: not connected here is not connected
            if self.remote:
                envelope = user_envelope(user, kind, data, *extra)
                reached = await self.bus.route_wait(user, envelope, patient=True)
                if reached is not None and reached > 0:
                    return True
                if reached is not None and reached < 0:
                    return False  # offline everywhere: nobody to tell
            if attempt + 1 < attempts:
                await trio.sleep(pause)
        log.warning("event=delivery_given_up user=%s type=%s attempts=%d", user, kind, attempts)
        return False

    def peer_left(self, peer: str, leaver: str) -> None:
        """Send ``peer`` the server's ``hangup {reason: peer_left}`` on behalf of ``leaver``."""
        _, created = now()
        data = encode(
            Envelope(
                type=m.HANGUP,
                from_user=leaver,
                to_user=peer,
                payload=m.HangupNotice(reason=m.PEER_LEFT),
                message_id=new_message_id(),
                create_time=created,
            )
        )
        self.send(peer, data, m.HANGUP, leaver)

    def evict(self, instance: str, user: str, connection: str) -> None:
        """Tell ``instance`` to close ``user``'s connection ``connection`` (replaced here)."""
        if instance == self.instance:
            self._evict_here(user, connection)
        elif self.bus is not None:
            self.bus.publish_instance(instance, f"E{user} {connection}\n".encode())

    def ask_resume(self, instance: str, user: str, connection: str, token: str) -> None:
        """Ask ``instance`` to hand over ``user``'s session ``connection`` (resume_remote.py);
        it also evicts it there. The token rides in the body, never in the logged head."""
        if self.bus is not None:
            self.bus.publish_instance(instance, f"R{user} {connection} {self.instance}\n{token}".encode())

    def answer_resume(self, instance: str, user: str, status: str, frames: bytes) -> None:
        if self.bus is not None:
            self.bus.publish_instance(instance, f"Q{user} {status}\n".encode() + frames)

    def evict_here(self, user: str, connection: str) -> Client | None:
        return self._evict_here(user, connection)

    def _evict_here(self, user: str, connection: str) -> Client | None:
        client = self.hub.evict(user, connection)
        if client is not None:
            self.store.user_moved(user)
            log.info("event=replaced_elsewhere user=%s", user)
        return client

    # -- safety notices (PROTOCOL.md section 13) --------------------------------------------------

    def notify_block(self, user: str, blocker: str, on: bool) -> None:
        """``blocker`` blocks ``user`` now (``on``) or no longer: ``user``'s connection may
        not write to ``blocker`` while blocked."""
        client = self.hub.clients.get(user)
        if client is not None:
            _set_block(client, blocker, on)
        if self.bus is not None and self.remote:
            # Also where presence names the user, when it is here too: a connection here may be
            # one another instance has just replaced (its eviction on its way), and the new one
            # registered before the block was stored, so it read none (PROTOCOL.md section 13).
            # Back here, the notice only repeats what was set.
            self.bus.route(user, f"B{user} {blocker} {int(on)}\n".encode())

    def safety_at_connect(self, user: str, blocked_by: AbstractSet[str], shadow: bool) -> None:
        client = self.hub.clients.get(user)
        if client is None:
            return
        if not blocked_by <= client.blocked_by:
            client.blocked_by = set(client.blocked_by) | blocked_by
        if shadow:
            client.shadow = True

    # What this instance's connections know of their safety: the Redis store's matching
    # while Redis is unreachable, when the shadow set and blocks in Redis cannot be read.

    def barred(self, user: str) -> AbstractSet[str] | None:
        client = self.hub.clients.get(user)
        return None if client is None else client.blocked_by or None

    def shadowed(self, user: str) -> bool:
        client = self.hub.clients.get(user)
        return client is not None and client.shadow

    def notify_shadow(self, user: str, on: bool) -> None:
        client = self.hub.clients.get(user)
        if client is not None:
            client.shadow = on
        if self.bus is not None and self.remote:  # also where presence names it: ``notify_block``
            self.bus.route(user, f"S{user} {int(on)}\n".encode())

    def kick(self, user: str, *, everywhere: bool = False) -> bool:
        """Close ``user``'s connection with 4003 wherever it is; whether it was found here
        (a notice to another instance is not confirmed). ``everywhere`` (a ban): also where
        presence names the user when it is here too, as ``notify_block`` does; a plain kick
        does not, so that a reconnect here a moment later is not closed as well."""
        client = self.hub.clients.get(user)
        if client is not None:
            client.ws.close(BANNED, "banned")
        if (client is None or everywhere) and self.bus is not None and self.remote:
            self.bus.route(user, f"K{user}\n".encode())
        return client is not None

    # -- from the bus (trio thread) ----------------------------------------------------------

    def on_bus_messages(self, items: list[tuple[str | None, bytes]]) -> None:
        """What the bus read in one go, in its order. A room's messages are gathered into one
        run per room and each run is sent with one write per member: a hand-over holds the
        messages of many rooms interleaved, and sending each room's short stretches apart
        made a system call per message per member (the memory store's broadcasters gather per
        room the same way). Each room keeps its order; a level-2 item of a room goes after
        that room's earlier messages, and a message to one user after every earlier room
        message. Between rooms there is no order to keep: nobody sees two rooms' messages
        from one sender interleaved in a way the protocol promises."""
        runs: dict[str, list[bytes]] = {}
        for room, data in items:
            if room is not None:
                if data and data[0] == LEVEL2_ITEM:  # a presence event or typing, in order
                    run = runs.pop(room, None)
                    if run:
                        self.hub.broadcast_now(room, run)
                    try:
                        self.presence.on_room_item(room, data)
                    except Exception:
                        log.exception("event=bus_item_failed room=%r head=%r", room, data[:80])
                    continue
                run = runs.get(room)
                if run is None:
                    runs[room] = [text_frame(data)]
                else:
                    run.append(text_frame(data))
                continue
            if runs:
                self._send_runs(runs)
                runs = {}
            try:
                self._instance_message(data)
            except Exception:
                # An item its handler cannot take (a bug another instance's message reaches)
                # costs that item, not the rest of the hand-over: the bus would otherwise drop
                # the whole batch, other users' messages with it, and reconnect.
                log.exception("event=bus_item_failed head=%r", data[:80])
        if runs:
            self._send_runs(runs)

    def _send_runs(self, runs: dict[str, list[bytes]]) -> None:
        broadcast = self.hub.broadcast_now
        for room, frames in runs.items():
            broadcast(room, frames)

    def _instance_message(self, data: bytes) -> None:
        head, _, payload = data.partition(b"\n")
        fields = head[1:].decode(errors="replace").split(" ")
        if head[:1] == b"E" and len(fields) == 2:
            self._evict_here(fields[0], fields[1])
            return
        if head[:1] in (b"B", b"S", b"K") and not payload:
            self._safety_notice(head[:1], fields)
            return
        if head[:1] in (b"R", b"Q") and self.resume_handlers is not None:
            asked, answered = self.resume_handlers
            if head[:1] == b"R" and len(fields) == 3:
                asked(fields[0], fields[1], fields[2], payload.decode(errors="replace"))
                return
            if head[:1] == b"Q" and len(fields) == 2:
                answered(fields[0], fields[1], payload)
                return
        if head[:1] != b"U" or len(fields) < 2:
            log.warning("event=bus_message_unreadable head=%r", head[:80])
            return
        user, kind = fields[0], fields[1]
        if user not in self.hub.clients:
            self.dropped += 1
            return
        if kind == m.ASSIGN_ROLE and len(fields) in (4, 5):
            if fields[2] in self.hub.clients[user].blocking:
                # A match made on another instance a moment before this user blocked the peer:
                # the block ended it in the store (the peer heard ``peer_left``) and this user
                # was answered ``user_blocked``; it is not handed the match it ended.
                self.dropped += 1
                return
            if len(fields) == 5:  # a search announcement, maybe sent again (``send_surely``)
                client = self.hub.clients[user]
                if client.announced == fields[4]:
                    return
                client.announced = fields[4]
            self.store.remote_match(user, fields[2], fields[3])
        elif kind == m.HANGUP and len(fields) == 3:
            self.store.remote_match_ended(user, fields[2])
        elif kind == m.TYPING and not self.hub.clients[user].level2:
            return  # level 1 never hears typing
        self.hub.deliver(user, text_frame(payload), kind)

    def _safety_notice(self, kind: bytes, fields: list[str]) -> None:
        client = self.hub.clients.get(fields[0])
        if client is None:
            self.dropped += 1
            return
        if kind == b"B" and len(fields) == 3:
            _set_block(client, fields[1], fields[2] == "1")
        elif kind == b"S" and len(fields) == 2:
            client.shadow = fields[1] == "1"
        elif kind == b"K" and len(fields) == 1:
            client.ws.close(BANNED, "banned")
        else:
            log.warning("event=bus_message_unreadable head=%r", b" ".join(f.encode() for f in fields)[:80])


def _set_block(client: Client, blocker: str, on: bool) -> None:
    # Most users are never blocked: the empty default is one shared frozenset.
    blocked_by = set(client.blocked_by)
    if on:
        blocked_by.add(blocker)
    else:
        blocked_by.discard(blocker)
    client.blocked_by = blocked_by if blocked_by else frozenset()
