"""Write-behind for history: a bounded FIFO of messages not yet confirmed by Redis.

How this works. ``add`` is synchronous and O(1): the message joins the queue and the writer
is woken; live delivery never waits. ``drain`` takes up to ``batch`` entries at a time and
writes them in one pipeline (per room: one ``room_append`` script: ZADD, trim by score to
the TTL and by rank to the cap, PEXPIRE; per DM: one ``dm_append`` script). A room message
the bus carries is not queued here: the script that publishes it stores it
(``redis_stamp``); only those the bus could not carry are. An entry stays
"pending" until its pipeline succeeded; a failed batch goes back to the front of the queue,
so the order is kept and nothing is lost but what the bound forces out (the oldest first,
counted in ``dropped``). The bound is ``capacity`` entries and, when given, ``capacity_bytes``
of queued messages (the server's history memory budget, PROTOCOL.md section 16): in Redis
mode this queue is the only history the server holds while Redis is healthy.

A failed pipeline may have run in part. Room writes are idempotent (``room_append`` skips a
message it holds, with any time); DM appends are not, so the entries of a returned batch
are marked "suspect" and ``dm_append`` skips a suspect message the list already holds.

Reads see what is still pending: ``pending(kind, key)`` snapshots the queued and in-flight
entries of one room or DM, to merge with what Redis returns (see ``RedisStore``).

An entry may carry an acknowledgement (``on_stored``, for the sender's own copy of a DM):
it is called once, on the trio thread, when the pipeline holding the entry succeeded --
or when the entry is dropped to make room, or, through ``acknowledge_all``, when the store
degrades (degraded mode acknowledges at once and writes later). Such an entry does not
wait for company: the writer starts a pipeline at once (``urgent``). ``when_written`` is the
same promise for everything queued so far, asked for after the fact (a room message's
sender's copy, when the bus gave up publishing it and delivered it locally): it is kept
until every entry added before it has been written or dropped.

Live publishes (scale-out, ``redis_bus``) ride in the same pipelines, after the history
writes: a message is in Redis' history before any instance receives it (a publish carries
the history mark of when it was queued, and goes in no pipeline before the entries queued
before it). They are never retried: a failed pipeline reports them failed and the caller
delivers locally.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Protocol

import attrs
import redis
import trio

from aleatoria.codec import rfc3339
from aleatoria.store.redis_client import RedisClient, Scripts
from aleatoria.store.redis_request import Request

log = logging.getLogger("aleatoria.store.redis")

ROOM = 0
DM = 1

ROOM_MESSAGES_PREFIX = "room:messages:"
DM_PREFIX = "dm:"


OnStored = Callable[[], None]


class Ack:
    """An entry's acknowledgement: a callback called at most once."""

    __slots__ = ("_fn",)

    def __init__(self, fn: OnStored) -> None:
        self._fn: OnStored | None = fn

    def fire(self) -> None:
        fn, self._fn = self._fn, None
        if fn is None:
            return
        try:
            fn()
        except Exception:
            # Someone else's callback must not take the writer (and the store) down.
            log.exception("event=on_stored_failed")


# (kind, key, message, created_ns, ack); key is the room name or "a:b" for a DM.
Entry = tuple[int, str, bytes, int, Ack | None]

# Adds one command (its arguments) to the request being built.
Command = Callable[..., None]


@attrs.frozen
class LiveScripts:
    """What the bus's items need of the writer's pipeline: the scripts' hashes, and the
    room history's trim (a room message is stored by the script that publishes it)."""

    route_sha: str
    room_send_sha: str
    cutoff_ns: int
    cap: int
    ttl_ms: int


class LiveSource(Protocol):
    """Publishes to send with the history (the bus's outbox)."""

    def pending(self) -> int: ...

    def take(self, limit: int, upto: int) -> list[Any]: ...

    def add_to_pipeline(self, command: Command, items: list[Any], scripts: LiveScripts) -> list[int]:
        """Add commands for ``items``; for each item, which of them answers for it."""
        ...

    def settle(self, items: list[Any], replies: list[Any] | None) -> None: ...


class WriteBehind:
    """The queue, its writer's batching, and the bookkeeping reads need."""

    def __init__(
        self,
        *,
        capacity: int,
        capacity_bytes: int | None = None,
        batch: int,
        ttl_ns: int,
        history_max: int,
        scripts: Scripts,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.capacity = max(1, capacity)
        self.capacity_bytes = capacity_bytes
        self.queued_bytes = 0  # of the messages in the queue (a batch in flight is not counted)
        self._batch = max(1, batch)
        self._ttl_ns = ttl_ns
        self._ttl_ms = max(1, ttl_ns // 1_000_000)
        self._cap = history_max
        self._scripts = scripts
        self._clock_ns = clock_ns
        self._queue: deque[Entry] = deque()
        self._inflight: list[Entry] = []
        self._pending: dict[tuple[int, str], int] = {}
        self._suspects = 0
        self._wake = trio.Event()
        # Entries are numbered in the order they were added: ``added`` is the next number,
        # ``_head`` the number of the queue's first entry (publishes wait for it, see
        # ``LiveSource.take``).
        self.added = 0
        self._head = 0
        self.urgent = False  # an entry waits for its acknowledgement: write at once
        # ``when_written`` promises: (``added`` when asked, ack), in that order. An entry is
        # settled (written or dropped) once its number is below ``_settled``.
        self._waiters: deque[tuple[int, Ack]] = deque()
        self._inflight_from = 0  # number of the first entry in flight
        # Held by whoever writes (the writer task, a recovery, the final flush): one at a
        # time, so batches reach Redis in queue order.
        self.lock = trio.Lock()
        self.dropped = 0
        self.written = 0

    def __len__(self) -> int:
        return len(self._queue) + len(self._inflight)

    def mark(self) -> int:
        """How many entries were ever added (a publish waits for those added before it)."""
        return self.added

    @property
    def queued(self) -> int:
        """Entries waiting for a batch (not counting the one in flight)."""
        return len(self._queue)

    # -- producer side (trio thread, never blocks) ------------------------------------------

    def add(
        self, kind: int, key: str, message: bytes, created_ns: int, on_stored: OnStored | None = None
    ) -> int:
        """Queue one message; returns how many old entries were dropped to make room.
        ``on_stored``: see the module doc."""
        ack = None
        if on_stored is not None:
            ack = Ack(on_stored)
            self.urgent = True
        self._queue.append((kind, key, message, created_ns, ack))
        self.queued_bytes += len(message)
        self.added += 1
        slot = (kind, key)
        self._pending[slot] = self._pending.get(slot, 0) + 1
        dropped = self._enforce_capacity()
        if not self._wake.is_set():
            self._wake.set()
        return dropped

    def pending(self, kind: int, key: str) -> list[tuple[int, bytes]]:
        """The (created_ns, message) entries of one room or DM not yet confirmed, oldest first."""
        if not self._pending.get((kind, key)):
            return []
        out: list[tuple[int, bytes]] = []
        for source in (self._inflight, self._queue):
            for entry_kind, entry_key, message, created_ns, _ in source:
                if entry_kind == kind and entry_key == key:
                    out.append((created_ns, message))
        return out

    def entries(self) -> Iterator[Entry]:
        """Every entry not yet confirmed (in flight, then queued), oldest first."""
        yield from self._inflight
        yield from self._queue

    def acknowledge_all(self) -> None:
        """Acknowledge every entry (and ``when_written`` promise) now (the store degraded: it
        serves from memory and writes later). Entries stay queued."""
        self.urgent = False
        for entry in list(self.entries()):
            ack = entry[4]
            if ack is not None:
                ack.fire()
        waiters, self._waiters = self._waiters, deque()
        for _, ack in waiters:
            ack.fire()

    def when_written(self, fn: OnStored) -> None:
        """Call ``fn`` once, on the trio thread, when every entry added so far has been
        written (its pipeline succeeded) or dropped to make room -- at once if there is none
        -- or when ``acknowledge_all`` runs. Cheap: an entry in a list, checked after each
        pipeline."""
        mark = self.added
        if mark <= self._settled:
            Ack(fn).fire()
            return
        self._waiters.append((mark, Ack(fn)))
        self.urgent = True  # someone is waiting: no reason to let the batch gather
        if not self._wake.is_set():
            self._wake.set()

    @property
    def _settled(self) -> int:
        """Entries numbered below this are written or dropped (pipelines run in queue order;
        while one is in flight, its entries are not settled yet)."""
        return self._inflight_from if self._inflight else self._head

    def _fire_waiters(self) -> None:
        waiters = self._waiters
        settled = self._settled
        while waiters and waiters[0][0] <= settled:
            waiters.popleft()[1].fire()

    # -- writer side ---------------------------------------------------------------------------

    def poke(self) -> None:
        """Wake the writer (something else for its pipeline is queued: a publish)."""
        if not self._wake.is_set():
            self._wake.set()

    async def wait(self, live: LiveSource | None = None) -> None:
        """Return once something is queued (history, or a publish in ``live``)."""
        while not self._queue and not (live is not None and live.pending()):
            if self._wake.is_set():
                self._wake = trio.Event()
                continue
            await self._wake.wait()

    async def wait_for_live(self, live: LiveSource, seconds: float) -> None:
        """Sleep ``seconds``, or less if a publish (or an entry waiting for its
        acknowledgement) gets queued meanwhile."""
        with trio.move_on_after(seconds):
            while not live.pending() and not self.urgent:
                if self._wake.is_set():
                    self._wake = trio.Event()
                await self._wake.wait()

    async def drain(
        self,
        client: RedisClient,
        *,
        gate: Callable[[], bool],
        keep_going: Callable[[], bool],
        live: LiveSource | None = None,
    ) -> None:
        """Write queued batches (and ``live`` publishes, after them) until both are empty or
        ``keep_going()`` is false. Call it holding ``lock``. Raises StoreUnavailable (the
        failed batch is back at the front; the publishes are reported failed). Cancellation:
        the batch in flight completes or goes back to the queue."""
        while (self._queue or (live is not None and live.pending())) and keep_going():
            self.urgent = False
            batch = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
            self._inflight_from = self._head
            self._head += len(batch)
            self.queued_bytes -= sum(len(entry[2]) for entry in batch)
            items = live.take(self._batch, self._head) if live is not None else []
            suspects = min(self._suspects, len(batch))
            self._suspects -= suspects
            self._inflight = batch
            try:
                replies = await client.call(
                    partial(self._write, batch=batch, suspects=suspects, live=live, items=items), gate=gate
                )
            except BaseException:
                self._give_back(batch)
                if live is not None:
                    live.settle(items, None)
                raise
            self._inflight = []
            self.written += len(batch)
            for kind, key, _, _, ack in batch:
                self._release((kind, key))
                if ack is not None:
                    ack.fire()
            if self._waiters:
                self._fire_waiters()
            if live is not None:
                live.settle(items, replies)

    # -- internals -------------------------------------------------------------------------------

    def _write(
        self,
        r: redis.Redis,
        *,
        batch: list[Entry],
        suspects: int,
        live: LiveSource | None = None,
        items: list[Any] | None = None,
    ) -> list[Any]:
        """One pipeline for the whole batch, then the publishes (runs on a worker thread).
        Returns the replies of the publishes."""
        cutoff_ns = self._clock_ns() - self._ttl_ns
        rooms: dict[str, list[int | bytes]] = {}
        dms: dict[str, tuple[list[int], list[bytes]]] = {}
        for index, entry in enumerate(batch):
            kind, key, message, created_ns = entry[:4]
            if kind == ROOM:
                rooms.setdefault(key, []).extend((created_ns, message))
            else:
                counted, messages = dms.setdefault(key, ([0], []))
                messages.append(message)
                if index < suspects:  # suspects are a prefix of the batch, so of each DM too
                    counted[0] += 1
        request: Request | _Pipeline = Request() if isinstance(r, redis.Redis) else _Pipeline(r)
        command = request.command
        room_sha = self._scripts.room_append.sha
        for room, pairs in rooms.items():
            key = ROOM_MESSAGES_PREFIX + room
            command("EVALSHA", room_sha, 1, key, cutoff_ns, self._cap, self._ttl_ms, *pairs)
        dm_sha = self._scripts.dm_append.sha
        cutoff_s = repr(cutoff_ns / 1e9)
        cutoff_text = rfc3339(cutoff_ns)
        for key, (counted, messages) in dms.items():
            dm = DM_PREFIX + key
            command(
                "EVALSHA",
                dm_sha,
                1,
                dm,
                cutoff_s,
                self._cap,
                self._ttl_ms,
                counted[0],
                cutoff_text,
                *messages,
            )
        slots: list[int] = []
        if live is not None and items:
            scripts = self._scripts
            slots = live.add_to_pipeline(
                command,
                items,
                LiveScripts(scripts.route.sha, scripts.room_send.sha, cutoff_ns, self._cap, self._ttl_ms),
            )
        replies = request.send(r)
        if not slots:
            return []
        live_replies = replies[len(replies) - (max(slots) + 1) :]
        return [live_replies[slot] for slot in slots]

    def _give_back(self, batch: list[Entry]) -> None:
        self._inflight = []
        self._queue.extendleft(reversed(batch))
        self._head -= len(batch)
        self.queued_bytes += sum(len(entry[2]) for entry in batch)
        self._suspects += len(batch)
        self._enforce_capacity()

    def _over_capacity(self) -> bool:
        if len(self._queue) > self.capacity:
            return True
        limit = self.capacity_bytes
        return limit is not None and self.queued_bytes > limit and len(self._queue) > 1

    def _enforce_capacity(self) -> int:
        dropped = 0
        while self._over_capacity():
            kind, key, message, _, ack = self._queue.popleft()
            self._head += 1
            self.queued_bytes -= len(message)
            self._release((kind, key))
            if self._suspects:
                self._suspects -= 1
            if ack is not None:
                ack.fire()  # lost (counted): its sender is not kept waiting forever
            dropped += 1
        self.dropped += dropped
        if dropped and self._waiters:
            self._fire_waiters()
        return dropped

    def _release(self, slot: tuple[int, str]) -> None:
        left = self._pending[slot] - 1
        if left:
            self._pending[slot] = left
        else:
            del self._pending[slot]


class _Pipeline:
    """The same commands on a redis-py pipeline (a Redis Cluster routes them by key)."""

    def __init__(self, r: Any) -> None:
        self._pipe = r.pipeline(transaction=False)

    def command(self, *args: bytes | str | int) -> None:
        self._pipe.execute_command(*args)

    def send(self, r: Any) -> list[Any]:
        replies: list[Any] = self._pipe.execute()
        return replies
