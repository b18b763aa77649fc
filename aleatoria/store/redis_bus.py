"""The cross-instance bus on Redis pub/sub (PROTOCOL.md section 9), bridged into trio.

How this works.
- Channels. Each instance subscribes to its own channel (``instance_channel(id)``) for frames
  aimed at one user, and to one channel per room that has local members (subscribed on the
  first local member, unsubscribed after the last). Room channels carry the room history
  key as hash tag (``aleatoria:room:{room:messages:R}``), so on a Redis Cluster the message
  and its history write go to the same shard, in order; instance channels carry the pool's
  tag (see ``redis_presence``). On a cluster every channel is sharded (SSUBSCRIBE/SPUBLISH).
- Receiving. One thread owns the redis-py PubSub object (it is not thread-safe). It loops:
  apply queued (un)subscribe commands, drain what is readable without blocking, hand the
  batch to trio with one ``trio.from_thread.run_sync`` call (the handler runs on the trio
  thread and sends to sockets synchronously), then wait in ``select`` on the subscription
  socket(s) and a wake-up pipe (written when a command is queued or on cancellation). The
  hand-off blocks the thread until trio has delivered the batch: no second queue, no drop
  and no reordering; if trio falls behind, Redis holds the backlog in its output buffer
  (and disconnects us past ``client-output-buffer-limit pubsub``: we reconnect, and say so).
- Sending. Publishes are not made here: they queue in ``outbox`` and the Redis store's
  writer sends them in the same pipeline as the pending history writes, after them (so a
  message is in Redis' history before anyone receives it: a publish waits for the history
  queued before it, ``Outgoing.after``). ``route`` is the ``route`` script: presence lookup,
  liveness check and publish in one step; its result (subscribers reached) comes back
  through ``Outgoing.done``.
- Up/down. ``up`` is true once the instance channel is subscribed on the current
  connection; a failed connection makes it false until the thread has reconnected (with
  backoff) and resubscribed everything. Callers deliver locally while it is down.
- Stalls. Redis that hangs (no error, no reply) is noticed by the store only after a call
  timeout (2 s by default); live chat must not wait that long. A watchdog declares the bus
  stalled when a publish has waited ``STALL_SECONDS``: queued and in-flight publishes are
  reported failed (callers deliver locally) and new ones are not made until a pipeline
  returns or the store recovers.
- Delivered once. This instance's own room messages are followed from publish to delivery
  (``redis_echo``): whichever comes first -- the pub/sub copy, or giving up on the publish
  (a stall, a failed pipeline, the subscription lost) -- delivers it to the local members,
  and the other is dropped; so a copy that arrived before a late reply is not delivered
  again by the fallback, and a message delivered by the fallback that Redis publishes after
  all is not delivered twice. The bookkeeping ends with each message (time-bounded).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import select
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import redis
import trio
from redis.exceptions import RedisClusterException

from aleatoria.store.base import BusHandler
from aleatoria.store.redis_client import RedisClient, describe_error
from aleatoria.store.redis_echo import Echo, Echoes
from aleatoria.store.redis_presence import INSTANCES_KEY, PRESENCE_KEY, instance_channel
from aleatoria.store.redis_scripts import MATCHES_KEY
from aleatoria.store.redis_writer import ROOM_MESSAGES_PREFIX

log = logging.getLogger("aleatoria.store.bus")

ROOM_CHANNEL_PREFIX = "aleatoria:room:"
_BATCH = 512
_POLL_SECONDS = 1.0
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0
_OUTBOX_MAX = 10_000
STALL_SECONDS = 0.25
_WATCH_EVERY = 0.05
# How long a room message delivered here by the fallback is still recognised when Redis
# publishes it after all (see ``redis_echo``); and how many such messages at most.
ECHO_GRACE = 5.0
_ECHO_LIMIT = 10_000

# Outgoing kinds.
PUBLISH = 0  # to a channel (room or instance)
ROUTE = 1  # to a user, through presence

_SUBSCRIBE = "s"
_UNSUBSCRIBE = "u"


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
    target: str  # channel (PUBLISH) or user (ROUTE)
    message: bytes
    done: Callable[[int | None], None] | None = None  # subscribers reached; None = failed
    sender: str = ""  # ROUTE: refused (0) if the user is in a live match with someone else
    echo: Echo | None = None  # a room message of this instance (then ``done`` is in it)
    queued_at: float = attrs.Factory(trio.current_time)
    after: int = 0  # the writer's history mark when queued: those entries go first
    settled: bool = False


class RedisBus:
    """Subscriptions, the subscriber thread and the outbox. Created by the Redis store."""

    def __init__(self, client: RedisClient, instance: str, *, cluster: bool) -> None:
        self._client = client
        self.instance = instance
        self.cluster = cluster
        self.own_channel = instance_channel(instance)
        self._publish_command = "SPUBLISH" if cluster else "PUBLISH"
        self.up = False
        self._up_event = trio.Event()
        self.handler: BusHandler | None = None
        self.outbox: deque[Outgoing] = deque()
        self.on_queued: Callable[[], None] = _nothing  # the writer's wake-up
        self.history_mark: Callable[[], int] = _zero  # the writer's count of entries queued
        self.store_ok = False  # set by the store: publishing needs the store healthy too
        self.refused = 0  # publishes refused because the outbox was full
        self.received = 0
        self.reconnects = 0
        self.stalls = 0
        self.stalled = False
        self._inflight: list[Outgoing] = []
        self._inflight_since: float | None = None
        self.echoes = Echoes(grace=ECHO_GRACE, limit=_ECHO_LIMIT)
        # Subscription bookkeeping (trio thread only). ``_pending`` counts commands sent or
        # queued per channel whose confirmation has not arrived; a channel is confirmed
        # when it is wanted and nothing is pending.
        self._wanted: set[str] = set()
        self._confirmed: set[str] = set()
        self._pending: dict[str, int] = {}
        self._waiters: dict[str, trio.Event] = {}
        # Thread hand-over: commands for the thread (deque ops are atomic) and a wake pipe.
        self._commands: deque[tuple[str, str]] = deque()
        self._wake_r = -1
        self._wake_w = -1
        self._down_reason = ""

    # -- publishing (trio thread) ---------------------------------------------------------

    def publish_room(
        self, room: str, message: bytes, done: Callable[[int | None], None] | None = None
    ) -> bool:
        """Publish a room message of this instance. With ``done`` (the caller's local
        delivery), its local members get it exactly once: from its pub/sub copy, or from the
        caller -- ``done(None)`` -- when the bus gives up on it first (``redis_echo``).
        Otherwise ``done`` gets the subscribers reached (1 if only its copy is known)."""
        channel = room_channel(room)
        if done is None:
            return self._queue(Outgoing(PUBLISH, channel, message))
        sure = self.up and channel in self._confirmed
        echo = self.echoes.expect(message, channel, done, sure=sure)
        return self._queue(Outgoing(PUBLISH, channel, message, echo=echo))

    def publish_instance(self, instance: str, message: bytes) -> bool:
        return self._queue(Outgoing(PUBLISH, instance_channel(instance), message))

    def route(self, user: str, message: bytes, done: Callable[[int | None], None] | None = None) -> bool:
        return self._queue(Outgoing(ROUTE, user, message, done))

    async def route_wait(self, user: str, message: bytes, sender: str = "") -> int | None:
        """Route ``message`` to ``user``'s instance and wait for the outcome: how many
        subscribers got it (0: offline, or -- given ``sender`` -- in a live match with
        someone else), None if Redis failed or the outbox is full.
        Cancellation: the message may still be sent."""
        result: list[int | None] = []
        arrived = trio.Event()

        def done(value: int | None) -> None:
            result.append(value)
            arrived.set()

        if not self._queue(Outgoing(ROUTE, user, message, done, sender=sender)):
            return None
        await arrived.wait()
        return result[0]

    def _queue(self, item: Outgoing) -> bool:
        if len(self.outbox) >= _OUTBOX_MAX:
            self.refused += 1
            self._give_up(item, sent=False)
            return False
        item.after = self.history_mark()
        self.outbox.append(item)
        self.on_queued()
        return True

    @property
    def usable(self) -> bool:
        """Deliver through Redis now: subscribed, the store healthy, Redis not stalled."""
        return self.up and self.store_ok and not self.stalled

    def pending(self) -> int:
        return len(self.outbox)

    def gauges(self) -> dict[str, tuple[str, float]]:
        return {
            "aleatoria_bus_received": ("messages received from other instances' channels", self.received),
            "aleatoria_bus_outbox": ("publishes waiting for the writer", len(self.outbox)),
            "aleatoria_bus_refused": ("publishes refused: outbox full", self.refused),
            "aleatoria_bus_reconnects": ("subscription connections lost", self.reconnects),
            "aleatoria_bus_stalls": ("times Redis stalled and delivery went local", self.stalls),
            "aleatoria_bus_echoes": (
                "own room messages whose local delivery is still followed",
                len(self.echoes),
            ),
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
        ``upto`` (the writer's mark of its batch): for the writer's pipeline. They are in
        flight until ``settle``."""
        outbox = self.outbox
        items: list[Outgoing] = []
        while outbox and len(items) < limit and outbox[0].after <= upto:
            items.append(outbox.popleft())
        if items:
            self._inflight = items
            self._inflight_since = trio.current_time()
        return items

    def add_to_pipeline(self, pipe: Any, items: list[Outgoing], route_sha: str) -> None:
        """Queue ``items`` on a redis-py pipeline (runs on a worker thread)."""
        command = self._publish_command
        for item in items:
            if item.kind == PUBLISH:
                pipe.execute_command(command, item.target, item.message)
            else:
                pipe.execute_command(
                    "EVALSHA",
                    route_sha,
                    3,
                    PRESENCE_KEY,
                    INSTANCES_KEY,
                    MATCHES_KEY,
                    item.target,
                    item.message,
                    instance_channel(""),
                    command,
                    item.sender,
                )

    def settle(self, items: list[Outgoing], replies: list[Any] | None) -> None:
        """The writer's pipeline returned (trio thread): report each item's outcome, a count,
        or None for all when the pipeline failed. A pipeline that returned ends a stall."""
        if items and items is self._inflight:
            self._inflight = []
            self._inflight_since = None
        if replies is not None and self.stalled:
            self.stalled = False
            log.info("event=bus_stall_over instance=%s", self.instance)
        now = trio.current_time()
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
            oldest = self._inflight_since
            if self.outbox:
                first = self.outbox[0].queued_at
                oldest = first if oldest is None else min(oldest, first)
            if oldest is not None and trio.current_time() - oldest > STALL_SECONDS and not self.stalled:
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
            self._give_up(item, sent=True)
        self.fail_all()

    # -- subscriptions (trio thread) ------------------------------------------------------

    def subscribe_room(self, room: str) -> None:
        channel = room_channel(room)
        if channel in self._wanted:
            return
        self._wanted.add(channel)
        self._command(_SUBSCRIBE, channel)

    def unsubscribe_room(self, room: str) -> None:
        channel = room_channel(room)
        if channel not in self._wanted:
            return
        self._wanted.discard(channel)
        self._confirmed.discard(channel)
        self._command(_UNSUBSCRIBE, channel)
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

    def _command(self, op: str, channel: str) -> None:
        self._pending[channel] = self._pending.get(channel, 0) + 1
        self._commands.append((op, channel))
        self._wake()

    def _wake(self) -> None:
        if self._wake_w >= 0:
            # A full pipe means the thread will wake anyway.
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"\0")

    def _snapshot(self) -> list[str]:
        """A (re)connection starts: everything wanted is subscribed afresh (trio thread)."""
        self._commands.clear()
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

    def _dispatch(self, batch: list[dict[str, Any]]) -> None:
        """A batch from the thread (trio thread): confirmations and messages, in order."""
        items: list[tuple[str | None, bytes]] = []
        for message in batch:
            kind = message["type"]
            if isinstance(kind, bytes):
                kind = kind.decode()
            channel = message["channel"]
            if isinstance(channel, bytes):
                channel = channel.decode()
            if kind in ("message", "smessage"):
                data = message["data"]
                if channel == self.own_channel:
                    items.append((None, data))
                else:
                    room = _room_of(channel)
                    if room is not None and (not self.echoes or self.echoes.on_echo(data)):
                        items.append((room, data))
            elif kind in ("subscribe", "ssubscribe", "unsubscribe", "sunsubscribe"):
                self._confirmation(channel)
        self.received += len(items)
        if items and self.handler is not None:
            self.handler.on_bus_messages(items)

    # -- the subscriber thread ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the subscriber thread until cancelled. Reports started at once; ``up`` turns
        true when the subscription is live. Cancellation wakes the thread, which exits."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._wake_on_cancel)
                task_status.started()
                await trio.to_thread.run_sync(self._thread_main, limiter=trio.CapacityLimiter(1))
        finally:
            self.up = False
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    async def _wake_on_cancel(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._wake()

    def _thread_main(self) -> None:
        backoff = _BACKOFF_FIRST
        while True:
            trio.from_thread.check_cancelled()
            subscription: _Subscription | None = None
            try:
                channels = trio.from_thread.run_sync(self._snapshot)
                subscription = _Subscription(self._client.redis, cluster=self.cluster)
                subscription.subscribe(channels)
                backoff = _BACKOFF_FIRST
                self._pump(subscription)
            except (redis.RedisError, RedisClusterException, OSError) as exc:
                trio.from_thread.run_sync(self._went_down, describe_error(exc))
            except Exception as exc:
                # The thread is an error boundary: anything else (redis-py finding its
                # connection gone mid-read, a bug) costs a reconnection, never the server.
                log.exception("event=bus_error action=reconnecting")
                trio.from_thread.run_sync(self._went_down, describe_error(exc))
            finally:
                if subscription is not None:
                    subscription.close()
            self._sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def _pump(self, subscription: _Subscription) -> None:
        commands = self._commands
        while True:
            trio.from_thread.check_cancelled()
            while commands:
                op, channel = commands.popleft()
                if op == _SUBSCRIBE:
                    subscription.subscribe([channel])
                else:
                    subscription.unsubscribe(channel)
            batch = subscription.drain(_BATCH)
            if batch:
                trio.from_thread.run_sync(self._dispatch, batch)
                continue
            readable, _, _ = select.select([self._wake_r, *subscription.sockets()], [], [], _POLL_SECONDS)
            if self._wake_r in readable:
                self._drain_wake_pipe()

    def _sleep(self, seconds: float) -> None:
        """Back off, but wake for cancellation (the wake pipe)."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            readable, _, _ = select.select([self._wake_r], [], [], left)
            if readable:
                self._drain_wake_pipe()
                trio.from_thread.check_cancelled()

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass


def _nothing() -> None:
    pass


def _zero() -> int:
    return 0


class _Subscription:
    """One PubSub (plain Redis) or ClusterPubSub (sharded channels), used by one thread."""

    def __init__(self, client: Any, *, cluster: bool) -> None:
        self._cluster = cluster
        self._client = client
        self._pubsub: Any = client.pubsub(ignore_subscribe_messages=False)

    def subscribe(self, channels: list[str]) -> None:
        if self._cluster:
            for channel in channels:
                self._pubsub.ssubscribe(channel)
        else:
            self._pubsub.subscribe(*channels)

    def unsubscribe(self, channel: str) -> None:
        if self._cluster:
            self._pubsub.sunsubscribe(channel)
        else:
            self._pubsub.unsubscribe(channel)

    def drain(self, limit: int) -> list[dict[str, Any]]:
        """What can be read without blocking, up to ``limit`` messages."""
        out: list[dict[str, Any]] = []
        if not self._cluster:
            while len(out) < limit:
                message = self._pubsub.get_message(timeout=0)
                if message is None:
                    break
                out.append(message)
            return out
        for name in list(self._pubsub.node_pubsub_mapping):
            node = self._client.get_node(node_name=name)
            while len(out) < limit:
                message = self._pubsub.get_sharded_message(timeout=0, target_node=node)
                if message is None:
                    break
                out.append(message)
        return out

    def sockets(self) -> list[Any]:
        pubsubs = self._pubsub.node_pubsub_mapping.values() if self._cluster else [self._pubsub]
        out = []
        for pubsub in pubsubs:
            connection = pubsub.connection
            sock = None if connection is None else connection._sock  # redis-py keeps it private
            if sock is None:
                raise redis.ConnectionError("subscription connection closed")
            out.append(sock)
        return out

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            self._pubsub.close()
