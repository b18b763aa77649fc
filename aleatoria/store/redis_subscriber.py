"""The bus's subscriber thread: one redis-py subscription, bridged into trio.

How this works. One thread owns the redis-py PubSub object (it is not thread-safe). It
loops: apply queued (un)subscribe commands, drain what is readable without blocking, hand the
batch to trio with one ``trio.from_thread.run_sync`` call (``on_batch`` runs on the trio
thread and sends to sockets synchronously), then wait in ``select`` on the subscription
socket(s) and a wake-up pipe (written when a command is queued or on cancellation). The
hand-off blocks the thread until trio has handled the batch: no second queue, no drop and no
reordering; if trio falls behind, Redis holds the backlog in its output buffer (and
disconnects us past ``client-output-buffer-limit pubsub``: we reconnect, and say so).

A failed connection is reported (``on_down``, on the trio thread) and retried with backoff;
each new connection subscribes afresh to what ``channels()`` (trio thread) names, and the
commands queued before it are dropped (the list is current). This module knows channels,
not rooms or instances: ``redis_bus`` decides what to subscribe and what a message means.
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

import redis
import trio
from redis.exceptions import RedisClusterException

from aleatoria.store.redis_client import RedisClient, describe_error

log = logging.getLogger("aleatoria.store.bus")

_BATCH = 512
_POLL_SECONDS = 1.0
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0

_SUBSCRIBE = "s"
_UNSUBSCRIBE = "u"

# (type, channel, data), e.g. ("message", b"aleatoria:room:...", b"{...}"); type is text,
# channel and data as Redis sent them (bytes).
Message = tuple[str, Any, Any]
_MESSAGE = b"message"


class Subscriber:
    """The subscription thread. The three callbacks run on the trio thread: ``channels``
    when a connection starts (what to subscribe), ``on_batch`` with what was read, in order
    (messages and subscription confirmations), ``on_down`` with the reason a connection
    failed."""

    def __init__(
        self,
        client: RedisClient,
        *,
        cluster: bool,
        channels: Callable[[], list[str]],
        on_batch: Callable[[list[Message]], None],
        on_down: Callable[[str], None],
    ) -> None:
        self._client = client
        self._cluster = cluster
        self._channels = channels
        self._on_batch = on_batch
        self._on_down = on_down
        # Commands for the thread (deque operations are atomic) and the pipe that wakes it.
        self._commands: deque[tuple[str, str]] = deque()
        self._wake_r = -1
        self._wake_w = -1

    def subscribe(self, channel: str) -> None:
        """Subscribe ``channel`` on the current connection (trio thread; confirmed later,
        through ``on_batch``)."""
        self._command(_SUBSCRIBE, channel)

    def unsubscribe(self, channel: str) -> None:
        self._command(_UNSUBSCRIBE, channel)

    def _command(self, op: str, channel: str) -> None:
        self._commands.append((op, channel))
        self._wake()

    def _wake(self) -> None:
        if self._wake_w >= 0:
            # A full pipe means the thread will wake anyway.
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"\0")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the thread until cancelled. Reports started at once (the subscription comes
        up later). Cancellation wakes the thread, which exits; this returns once it has."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._wake_on_cancel)
                task_status.started()
                await trio.to_thread.run_sync(self._thread_main, limiter=trio.CapacityLimiter(1))
        finally:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    async def _wake_on_cancel(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._wake()

    # -- the thread ------------------------------------------------------------------------------

    def _fresh_start(self) -> list[str]:
        """A connection starts (trio thread): what was queued is superseded by the list."""
        self._commands.clear()
        return self._channels()

    def _thread_main(self) -> None:
        backoff = _BACKOFF_FIRST
        while True:
            trio.from_thread.check_cancelled()
            subscription: _Subscription | None = None
            try:
                channels = trio.from_thread.run_sync(self._fresh_start)
                subscription = _Subscription(self._client.redis, cluster=self._cluster)
                subscription.subscribe(channels)
                backoff = _BACKOFF_FIRST
                self._pump(subscription)
            except (redis.RedisError, RedisClusterException, OSError) as exc:
                trio.from_thread.run_sync(self._on_down, describe_error(exc))
            except Exception as exc:
                # The thread is an error boundary: anything else (redis-py finding its
                # connection gone mid-read, a bug) costs a reconnection, never the server.
                log.exception("event=bus_error action=reconnecting")
                trio.from_thread.run_sync(self._on_down, describe_error(exc))
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
                trio.from_thread.run_sync(self._on_batch, batch)
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

    def drain(self, limit: int) -> list[Message]:
        """What can be read without blocking, up to ``limit`` messages.

        A plain Redis: replies are read off the connection directly, and a published
        message becomes its tuple at once; everything else (subscription confirmations, a
        health check's pong) goes through redis-py's ``handle_message``, which keeps the
        PubSub's own bookkeeping. ``get_message`` per published message cost several times
        more than the message (its health check, observability hook and dict; measured in
        docs/performance.md, "Session 6")."""
        out: list[Message] = []
        if not self._cluster:
            pubsub = self._pubsub
            connection = pubsub.connection
            if connection is None:
                raise redis.ConnectionError("subscription connection closed")
            if connection.protocol not in (2, "2"):  # RESP3 pushes: redis-py's way
                return self._drain_messages(limit)
            pubsub.check_health()
            while len(out) < limit and connection.can_read(timeout=0):
                response = connection.read_response()
                if type(response) is list and len(response) == 3 and response[0] == _MESSAGE:
                    out.append(("message", response[1], response[2]))
                    continue
                message = pubsub.handle_message(response)
                if message is not None:
                    out.append(_message(message))
            return out
        for name in list(self._pubsub.node_pubsub_mapping):
            node = self._client.get_node(node_name=name)
            while len(out) < limit:
                message = self._pubsub.get_sharded_message(timeout=0, target_node=node)
                if message is None:
                    break
                out.append(_message(message))
        return out

    def _drain_messages(self, limit: int) -> list[Message]:
        out: list[Message] = []
        while len(out) < limit:
            message = self._pubsub.get_message(timeout=0)
            if message is None:
                break
            out.append(_message(message))
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


def _message(message: dict[str, Any]) -> Message:
    kind = message["type"]
    return (kind.decode() if isinstance(kind, bytes) else kind, message["channel"], message["data"])
