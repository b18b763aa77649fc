"""Write-behind for history: a bounded FIFO of messages not yet confirmed by Redis.

How this works. ``add`` is synchronous and O(1): the message joins the queue and the writer
is woken; live delivery never waits. ``drain`` takes up to ``batch`` entries at a time and
writes them in one pipeline (per room: one ``room_append`` script: ZADD, trim by score to
the TTL and by rank to the cap, PEXPIRE; per DM: one ``dm_append`` script). An entry stays
"pending" until its pipeline succeeded; a failed batch goes back to the front of the queue,
so the order is kept and nothing is lost but what the bound forces out (the oldest first,
counted in ``dropped``).

A failed pipeline may have run in part. Room writes are idempotent (ZADD of the same member
and score); DM appends are not, so the entries of a returned batch are marked "suspect" and
``dm_append`` skips a suspect message the list already holds.

Reads see what is still pending: ``pending(kind, key)`` snapshots the queued and in-flight
entries of one room or DM, to merge with what Redis returns (see ``RedisStore``).

Live publishes (scale-out, ``redis_bus``) ride in the same pipelines, after the history
writes: a message is in Redis' history before any instance receives it. They are never
retried: a failed pipeline reports them failed and the caller delivers locally.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import redis
import trio

from aleatoria.store.redis_client import RedisClient, Scripts

ROOM = 0
DM = 1

ROOM_MESSAGES_PREFIX = "room:messages:"
DM_PREFIX = "dm:"

# (kind, key, message, created_ns); key is the room name or "a:b" for a DM.
Entry = tuple[int, str, bytes, int]


class LiveSource(Protocol):
    """Publishes to send with the history (the bus's outbox)."""

    def pending(self) -> int: ...

    def take(self, limit: int) -> list[Any]: ...

    def add_to_pipeline(self, pipe: Any, items: list[Any], route_sha: str) -> None: ...

    def settle(self, items: list[Any], replies: list[Any] | None) -> None: ...


class WriteBehind:
    """The queue, its writer's batching, and the bookkeeping reads need."""

    def __init__(
        self,
        *,
        capacity: int,
        batch: int,
        ttl_ns: int,
        history_max: int,
        scripts: Scripts,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.capacity = max(1, capacity)
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
        # Held by whoever writes (the writer task, a recovery, the final flush): one at a
        # time, so batches reach Redis in queue order.
        self.lock = trio.Lock()
        self.dropped = 0
        self.written = 0

    def __len__(self) -> int:
        return len(self._queue) + len(self._inflight)

    @property
    def queued(self) -> int:
        """Entries waiting for a batch (not counting the one in flight)."""
        return len(self._queue)

    # -- producer side (trio thread, never blocks) ------------------------------------------

    def add(self, kind: int, key: str, message: bytes, created_ns: int) -> int:
        """Queue one message; returns how many old entries were dropped to make room."""
        self._queue.append((kind, key, message, created_ns))
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
            for entry_kind, entry_key, message, created_ns in source:
                if entry_kind == kind and entry_key == key:
                    out.append((created_ns, message))
        return out

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
        """Sleep ``seconds``, or less if a publish gets queued meanwhile."""
        with trio.move_on_after(seconds):
            while not live.pending():
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
            batch = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
            items = live.take(self._batch) if live is not None else []
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
            if live is not None:
                live.settle(items, replies)
            self._inflight = []
            self.written += len(batch)
            for kind, key, _, _ in batch:
                self._release((kind, key))

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
        for index, (kind, key, message, created_ns) in enumerate(batch):
            if kind == ROOM:
                rooms.setdefault(key, []).extend((created_ns, message))
            else:
                counted, messages = dms.setdefault(key, ([0], []))
                messages.append(message)
                if index < suspects:  # suspects are a prefix of the batch, so of each DM too
                    counted[0] += 1
        pipe = r.pipeline(transaction=False)
        evalsha = partial(_evalsha, pipe)
        room_sha = self._scripts.room_append.sha
        for room, pairs in rooms.items():
            key = ROOM_MESSAGES_PREFIX + room
            evalsha(room_sha, 1, key, cutoff_ns, self._cap, self._ttl_ms, *pairs)
        dm_sha = self._scripts.dm_append.sha
        cutoff_s = repr(cutoff_ns / 1e9)
        for key, (counted, messages) in dms.items():
            dm = DM_PREFIX + key
            evalsha(dm_sha, 1, dm, cutoff_s, self._cap, self._ttl_ms, counted[0], *messages)
        if live is not None and items:
            live.add_to_pipeline(pipe, items, self._scripts.route.sha)
        replies: list[Any] = pipe.execute()
        return replies[len(replies) - len(items) :] if items else []

    def _give_back(self, batch: list[Entry]) -> None:
        self._inflight = []
        self._queue.extendleft(reversed(batch))
        self._suspects += len(batch)
        self._enforce_capacity()

    def _enforce_capacity(self) -> int:
        dropped = 0
        while len(self._queue) > self.capacity:
            kind, key, _, _ = self._queue.popleft()
            self._release((kind, key))
            if self._suspects:
                self._suspects -= 1
            dropped += 1
        self.dropped += dropped
        return dropped

    def _release(self, slot: tuple[int, str]) -> None:
        left = self._pending[slot] - 1
        if left:
            self._pending[slot] = left
        else:
            del self._pending[slot]


def _evalsha(pipe: Any, *args: object) -> None:
    pipe.execute_command("EVALSHA", *args)
