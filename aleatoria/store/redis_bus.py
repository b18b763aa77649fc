"""The cross-instance bus on Redis pub/sub (PROTOCOL.md section 9), bridged into trio.

How this works.
- Channels. Each instance subscribes to its own channel (``instance_channel(id)``) for frames
  aimed at one user, and to one channel per room that has local members (subscribed on the
  first local member, unsubscribed after the last). Room channels carry the room history
  key as hash tag (``aleatoria:room:{room:messages:R}``), so on a Redis Cluster the message
  and its history write go to the same shard, in order; instance channels carry the pool's
  tag (see ``redis_presence``). On a cluster every channel is sharded (SSUBSCRIBE/SPUBLISH).
- Receiving. A thread owns the subscription (``redis_subscriber``) and hands what it reads
  to the trio thread in batches, in order; here they are sorted (room and instance
  messages for the handler, subscription confirmations for the bookkeeping below). The
  handler (the router, given through the store's ``attach``) sends to sockets synchronously.
- Sending. Publishes are not made here: they queue in ``outbox`` and the Redis store's
  writer sends them in the same pipeline as the pending history writes, after them (a
  publish waits for the history queued before it, ``Outgoing.after``). A room message is
  one ``room_send`` script (``redis_stamp``): Redis stamps its time, adds it to the room's
  history and publishes it, so it is in history before anyone receives it, and every
  instance receives a room's messages in the order of their times. ``route`` is the
  ``route`` script: presence lookup, liveness check and publish in one step. Results
  (subscribers reached) come back through ``Outgoing.done``.
- Up/down. ``up`` is true once the instance channel is subscribed on the current
  connection; a failed connection makes it false until the thread has reconnected (with
  backoff) and resubscribed everything. Callers deliver locally while it is down.
- Stalls. Redis that hangs (no error, no reply) is noticed by the store only after a call
  timeout (2 s by default); live chat must not wait that long. A watchdog declares the bus
  stalled when the writer's pipeline has been in flight for ``STALL_SECONDS`` with publishes
  in it or waiting behind it: queued and in-flight publishes are reported failed (callers
  deliver locally) and new ones are not made until a pipeline returns or the store
  recovers. Only a pipeline in flight counts: its return, or its failure (the store
  degrades, then recovers), is what ends the stall. Publishes that only wait for the writer
  task to run (the event loop busy, nothing sent to Redis yet) are no stall: failed, they
  would leave nothing queued -- nobody publishes on a stalled bus -- so no pipeline would
  ever return to end it, and this instance would reach no user elsewhere again (issue 14:
  matches and timeouts of the search queue given up).
- Delivered once. This instance's own room messages are followed from publish to delivery
  (``redis_echo``): whichever comes first -- the pub/sub copy, or giving up on the publish
  (a stall, a failed pipeline, the subscription lost) -- delivers it to the local members,
  and the other is dropped; so a copy that arrived before a late reply is not delivered
  again by the fallback, and a message delivered by the fallback that Redis publishes after
  all is not delivered twice. The bookkeeping ends with each message (time-bounded).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import trio

from aleatoria.store.base import BusHandler
from aleatoria.store.redis_client import RedisClient
from aleatoria.store.redis_echo import Echo, Echoes
from aleatoria.store.redis_presence import INSTANCES_KEY, PRESENCE_KEY, instance_channel
from aleatoria.store.redis_scripts import MATCHES_KEY
from aleatoria.store.redis_stamp import echo_key, stampable
from aleatoria.store.redis_subscriber import Message, Subscriber
from aleatoria.store.redis_writer import ROOM_MESSAGES_PREFIX, Command, LiveScripts

log = logging.getLogger("aleatoria.store.bus")

ROOM_CHANNEL_PREFIX = "aleatoria:room:"
_OUTBOX_MAX = 10_000
STALL_SECONDS = 0.25
_WATCH_EVERY = 0.05
# How long a room message delivered here by the fallback is still recognised when Redis
# publishes it after all (see ``redis_echo``); and how many such messages at most.
ECHO_GRACE = 5.0
_ECHO_LIMIT = 10_000
_ROOMS_CACHED = 4096

# Outgoing kinds.
PUBLISH = 0  # to a channel (room or instance)
ROUTE = 1  # to a user, through presence
SEND = 2  # a room message: stamped, stored and published by ``room_send``
# Marks the op of ``add_to_pipeline`` that gathers a room's messages into one ``room_send``.
_ROOM_SEND = object()


def room_channel(room: str) -> str:
    return f"{ROOM_CHANNEL_PREFIX}{{{ROOM_MESSAGES_PREFIX}{room}}}"


def _room_of(channel: str) -> str | None:
    if channel.startswith(ROOM_CHANNEL_PREFIX) and channel.endswith("}"):
        inner = channel[len(ROOM_CHANNEL_PREFIX) + 1 : -1]
        if inner.startswith(ROOM_MESSAGES_PREFIX):
            return inner[len(ROOM_MESSAGES_PREFIX) :]
    return None


@attrs.define(eq=False)
class Outgoing:
    """One publish waiting for the writer's next pipeline."""

    kind: int
    target: str  # channel (PUBLISH), user (ROUTE) or room (SEND)
    message: bytes
    done: Callable[[int | None], None] | None = None  # subscribers reached; None = failed
    sender: str = ""  # ROUTE: refused (0) if the user is in a live match with someone else
    # ROUTE: its caller waits for Redis' answer, so a stall does not give it up once it is in
    # a pipeline (``route_wait``).
    patient: bool = False
    echo: Echo | None = None  # a room message of this instance (then ``done`` is in it)
    queued_at: float = attrs.Factory(trio.current_time)
    after: int = 0  # the writer's history mark when queued: those entries go first
    settled: bool = False


class RedisBus:
    """Subscriptions, the outbox and the room messages' echoes. Created by the Redis store,
    with its writer's wake-up (``on_queued``) and count of history entries queued
    (``history_mark``: a publish goes in no pipeline before the entries queued before it)."""

    def __init__(
        self,
        client: RedisClient,
        instance: str,
        *,
        cluster: bool,
        on_queued: Callable[[], None],
        history_mark: Callable[[], int],
    ) -> None:
        self.instance = instance
        self.cluster = cluster
        self.own_channel = instance_channel(instance)
        self._publish_command = "SPUBLISH" if cluster else "PUBLISH"
        self.up = False
        self._up_event = trio.Event()
        # Who gets what arrives (the router). It cannot be given here: the router is built
        # on the store, so the store hands it over once it exists (``RedisStore.attach``);
        # until then nobody is connected and nothing that arrives has anyone to reach.
        self.handler: BusHandler | None = None
        self.outbox: deque[Outgoing] = deque()
        self._on_queued = on_queued
        self._history_mark = history_mark
        self.store_ok = False  # set by the store: publishing needs the store healthy too
        self.refused = 0  # publishes refused because the outbox was full
        self.received = 0
        self.batches = 0  # hand-overs from the subscriber thread
        self.reconnects = 0
        self.stalls = 0
        self.stalled = False
        # The publishes in the writer's pipeline in flight, and when that pipeline was started
        # (None: no pipeline in flight; see "Stalls" above).
        self._inflight: list[Outgoing] = []
        self._pipeline_since: float | None = None
        self.echoes = Echoes(grace=ECHO_GRACE, limit=_ECHO_LIMIT)
        # A room channel's name as Redis sends it -> its room (decoded once, not per message).
        self._rooms_by_channel: dict[bytes, str] = {}
        # Subscription bookkeeping (trio thread only). ``_pending`` counts commands sent or
        # queued per channel whose confirmation has not arrived; a channel is confirmed
        # when it is wanted and nothing is pending.
        self._wanted: set[str] = set()
        self._confirmed: set[str] = set()
        self._pending: dict[str, int] = {}
        self._waiters: dict[str, trio.Event] = {}
        self._down_reason = ""
        self._subscriber = Subscriber(
            client, cluster=cluster, channels=self._snapshot, on_batch=self._dispatch, on_down=self._went_down
        )

    # -- publishing (trio thread) ---------------------------------------------------------

    def publish_room(self, room: str, message: bytes) -> bool:
        """Publish an event to a room's channel (not a chat message: see ``send_room``)."""
        return self._queue(Outgoing(PUBLISH, room_channel(room), message))

    def send_room(self, room: str, message: bytes, done: Callable[[int | None], None]) -> bool:
        """Store and publish a chat message of this instance with Redis' time
        (``redis_stamp``). Its local members get it exactly
        once: from its pub/sub copy, or from the caller -- ``done(None)`` -- when the bus
        gives up on it first (``redis_echo``); the caller then also writes it to history.
        Otherwise ``done`` gets the subscribers reached (1 if only its copy is known)."""
        if not stampable(message):  # never from ``core``: it ends every message with its time
            done(None)
            return False
        channel = room_channel(room)
        sure = self.up and channel in self._confirmed
        echo = self.echoes.expect(echo_key(message), channel, done, sure=sure)
        return self._queue(Outgoing(SEND, room, message, echo=echo))

    def publish_instance(self, instance: str, message: bytes) -> bool:
        return self._queue(Outgoing(PUBLISH, instance_channel(instance), message))

    def route(self, user: str, message: bytes, done: Callable[[int | None], None] | None = None) -> bool:
        return self._queue(Outgoing(ROUTE, user, message, done))

    async def route_wait(
        self, user: str, message: bytes, sender: str = "", *, patient: bool = False
    ) -> int | None:
        """Route ``message`` to ``user``'s instance and wait for the outcome: how many
        subscribers got it (-1: the user is offline everywhere; 0: its instance cannot be
        reached now, or -- given ``sender`` -- the user is in a live match with someone
        else), None if Redis failed, the outbox is full or the bus stalled. ``patient``: once
        the message is queued, a stall does not end the wait (it stays queued, and the
        pipeline's answer ends it, or Redis failing): a caller that retries on None then never
        sends again what Redis did publish, nor sends late what a stall dropped (by then its
        user may be on a new connection). Cancellation: the message may still be sent."""
        result: list[int | None] = []
        arrived = trio.Event()

        def done(value: int | None) -> None:
            result.append(value)
            arrived.set()

        if not self._queue(Outgoing(ROUTE, user, message, done, sender=sender, patient=patient)):
            return None
        await arrived.wait()
        return result[0]

    def _queue(self, item: Outgoing) -> bool:
        if len(self.outbox) >= _OUTBOX_MAX:
            self.refused += 1
            self._give_up(item, sent=False)
            return False
        item.after = self._history_mark()
        self.outbox.append(item)
        self._on_queued()
        return True

    @property
    def usable(self) -> bool:
        """Deliver through Redis now: subscribed, the store healthy, Redis not stalled."""
        return self.up and self.store_ok and not self.stalled

    def pending(self) -> int:
        return len(self.outbox)

    def gauges(self) -> dict[str, tuple[str, float]]:
        return {
            "aleatoria_bus_outbox": ("publishes waiting for the writer", len(self.outbox)),
            "aleatoria_bus_echoes": (
                "own room messages whose local delivery is still followed",
                len(self.echoes),
            ),
        }

    def counters(self) -> dict[str, tuple[str, float]]:
        """Running totals (exported with ``_total``)."""
        return {
            "aleatoria_bus_received": ("messages received from other instances' channels", self.received),
            "aleatoria_bus_refused": ("publishes refused: outbox full", self.refused),
            "aleatoria_bus_reconnects": ("subscription connections lost", self.reconnects),
            "aleatoria_bus_stalls": ("times Redis stalled and delivery went local", self.stalls),
            "aleatoria_bus_echoes_dropped": (
                "pub/sub copies not delivered: the fallback had delivered them",
                self.echoes.dropped,
            ),
            "aleatoria_bus_echoes_forgotten": (
                "own room messages no longer followed to keep the table bounded",
                self.echoes.forgotten,
            ),
        }

    def take(self, limit: int, upto: int) -> list[Outgoing]:
        """Up to ``limit`` queued publishes, oldest first, that wait for no history entry past
        ``upto`` (the writer's mark of its batch): for the writer's pipeline, which starts now
        (with or without publishes) and is in flight until ``settle``."""
        outbox = self.outbox
        items: list[Outgoing] = []
        while outbox and len(items) < limit and outbox[0].after <= upto:
            items.append(outbox.popleft())
        self._inflight = items
        self._pipeline_since = trio.current_time()
        return items

    def add_to_pipeline(self, command: Command, items: list[Outgoing], scripts: LiveScripts) -> list[int]:
        """Add ``items`` to the writer's request (runs on a worker thread). Returns, for each
        item, which of the commands added answers for it: a room's chat messages share one
        ``room_send`` call (Redis' cost per message is mostly the call's), up to the next
        event published on that room's channel, which keeps its place after them."""
        ops: list[tuple[Any, ...]] = []  # a command's arguments, or (_ROOM_SEND, room, messages)
        open_sends: dict[str, int] = {}  # room -> its messages' place in ``ops``, while open
        slots: list[int] = []
        publish = self._publish_command
        for item in items:
            if item.kind == SEND:
                at = open_sends.get(item.target)
                if at is None:
                    at = open_sends[item.target] = len(ops)
                    ops.append((_ROOM_SEND, item.target, []))
                ops[at][2].append(item.message)
            elif item.kind == PUBLISH:
                room = _room_of(item.target)
                if room is not None:
                    open_sends.pop(room, None)  # later messages go after this event
                at = len(ops)
                ops.append((publish, item.target, item.message))
            else:
                at = len(ops)
                ops.append(
                    (
                        "EVALSHA",
                        scripts.route_sha,
                        3,
                        PRESENCE_KEY,
                        INSTANCES_KEY,
                        MATCHES_KEY,
                        item.target,
                        item.message,
                        instance_channel(""),
                        publish,
                        item.sender,
                    )
                )
            slots.append(at)
        for op in ops:
            if op[0] is not _ROOM_SEND:
                command(*op)
                continue
            _, room, messages = op
            command(
                "EVALSHA",
                scripts.room_send_sha,
                1,
                ROOM_MESSAGES_PREFIX + room,
                room_channel(room),
                publish,
                scripts.cutoff_ns,
                scripts.cap,
                scripts.ttl_ms,
                *messages,
            )
        return slots

    def settle(self, items: list[Outgoing], replies: list[Any] | None) -> None:
        """The writer's pipeline returned (trio thread): report each item's outcome, a count,
        or None for all when the pipeline failed. A pipeline that returned ends a stall."""
        if items is self._inflight:
            self._inflight = []
            self._pipeline_since = None
        if replies is not None and self.stalled:
            self.stalled = False
            log.info("event=bus_stall_over instance=%s", self.instance)
        now = trio.current_time()
        if replies is not None:
            self.echoes.answered(now)
        for index, item in enumerate(items):
            reply = None if replies is None else replies[index]
            count = reply if isinstance(reply, int) else None
            if item.echo is not None:
                self.echoes.returned(item.echo, count, now)  # also after a stall gave up
            self._report(item, count)

    def _report(self, item: Outgoing, count: int | None) -> None:
        if item.settled:
            return
        item.settled = True
        if item.done is not None:
            item.done(count)

    def _give_up(self, item: Outgoing, *, sent: bool) -> None:
        """Stop waiting for ``item`` (its caller falls back to local delivery)."""
        if item.echo is not None:
            self.echoes.give_up(item.echo, sent=sent)
        self._report(item, None)

    def fail_all(self) -> None:
        """Redis went away: every queued publish fails (callers fall back to local)."""
        outbox = self.outbox
        while outbox:
            self._give_up(outbox.popleft(), sent=False)

    def store_recovered(self) -> None:
        self.store_ok = True
        self.stalled = False

    async def watch_forever(self) -> None:
        """The stall watchdog (see the module doc), and the expiry of ``echoes``. Cancel to
        stop."""
        while True:
            await trio.sleep(_WATCH_EVERY)
            self.echoes.expire(trio.current_time())
            since = self._pipeline_since  # None: Redis is not keeping anything waiting
            if (
                since is not None
                and trio.current_time() - since > STALL_SECONDS
                and (self._inflight or self.outbox)
                and not self.stalled
            ):
                self._stall()

    def _stall(self) -> None:
        self.stalled = True
        self.stalls += 1
        log.warning(
            "event=bus_stalled instance=%s waited_over=%.2fs action=delivering_locally",
            self.instance,
            STALL_SECONDS,
        )
        for item in self._inflight:  # still in flight: the pipeline's outcome comes later
            if not item.patient:
                self._give_up(item, sent=True)
        # Patient routes stay queued, in order: their callers wait for Redis' answer, which
        # the next pipeline brings (``route_wait``).
        queued, self.outbox = self.outbox, deque()
        for item in queued:
            if item.patient:
                self.outbox.append(item)
            else:
                self._give_up(item, sent=False)

    # -- subscriptions (trio thread) ------------------------------------------------------

    def subscribe_room(self, room: str) -> None:
        channel = room_channel(room)
        if channel in self._wanted:
            return
        self._wanted.add(channel)
        self._count_pending(channel)
        self._subscriber.subscribe(channel)

    def unsubscribe_room(self, room: str) -> None:
        channel = room_channel(room)
        if channel not in self._wanted:
            return
        self._wanted.discard(channel)
        self._confirmed.discard(channel)
        self._count_pending(channel)
        self._subscriber.unsubscribe(channel)
        self.echoes.channel_dropped(channel)

    async def wait_up(self) -> None:
        """Return once the subscription is live. The caller bounds the wait."""
        await self._up_event.wait()

    async def room_ready(self, room: str) -> bool:
        """Wait until the room's channel is subscribed; False if the bus is (or went) down
        or the room is not wanted. The caller bounds the wait."""
        channel = room_channel(room)
        while self.up and channel in self._wanted and channel not in self._confirmed:
            event = self._waiters.get(channel)
            if event is None:
                event = self._waiters[channel] = trio.Event()
            await event.wait()
        return self.up and channel in self._confirmed

    def _count_pending(self, channel: str) -> None:
        self._pending[channel] = self._pending.get(channel, 0) + 1

    def _snapshot(self) -> list[str]:
        """A (re)connection starts: everything wanted is subscribed afresh (trio thread)."""
        self._confirmed.clear()
        channels = [self.own_channel, *sorted(self._wanted)]
        self._pending = dict.fromkeys(channels, 1)
        return channels

    def _confirmation(self, channel: str) -> None:
        left = self._pending.get(channel, 0) - 1
        if left > 0:
            self._pending[channel] = left
            return
        self._pending.pop(channel, None)
        if channel == self.own_channel:
            if not self.up:
                self.up = True
                self._up_event.set()
                log.info("event=bus_connected instance=%s channel=%s", self.instance, channel)
        elif channel in self._wanted:
            self._confirmed.add(channel)
        event = self._waiters.pop(channel, None)
        if event is not None:
            event.set()

    def _went_down(self, reason: str) -> None:
        self.reconnects += 1
        if self.up:
            log.warning(
                "event=bus_disconnected instance=%s reason=%r action=reconnecting", self.instance, reason
            )
        elif reason != self._down_reason:
            log.debug("event=bus_connect_failed reason=%r", reason)
        self._down_reason = reason
        self.up = False
        if self._up_event.is_set():
            self._up_event = trio.Event()
        self._confirmed.clear()
        for event in self._waiters.values():
            event.set()
        self._waiters.clear()
        self.echoes.connection_lost()

    def _dispatch(self, batch: list[Message]) -> None:
        """A batch from the thread (trio thread): confirmations and messages, in order."""
        self.batches += 1
        items: list[tuple[str | None, bytes]] = []
        own = self.own_channel
        echoes = self.echoes
        rooms = self._rooms_by_channel
        for kind, channel, data in batch:
            if kind in ("message", "smessage"):
                room = rooms.get(channel)
                if room is None:
                    if isinstance(channel, bytes):
                        channel = channel.decode()
                    if channel == own:
                        items.append((None, data))
                        continue
                    room = _room_of(channel)
                    if room is None:
                        continue
                    if len(rooms) >= _ROOMS_CACHED:
                        rooms.clear()
                    rooms[channel.encode()] = room
                if not echoes or echoes.on_echo(echo_key(data)):
                    items.append((room, data))
            elif kind in ("subscribe", "ssubscribe", "unsubscribe", "sunsubscribe"):
                self._confirmation(channel.decode() if isinstance(channel, bytes) else channel)
        self.received += len(items)
        if items and self.handler is not None:
            self.handler.on_bus_messages(items)

    # -- the subscriber thread ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the subscriber thread until cancelled. Reports started at once; ``up`` turns
        true when the subscription is live. Cancellation stops the thread; this returns once
        it has."""
        try:
            await self._subscriber.run(task_status=task_status)
        finally:
            self.up = False
