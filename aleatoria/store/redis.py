"""The Redis/Valkey store (PROTOCOL.md section 6): persistence that live traffic never waits on.

How this works.
- A ``MemoryStore`` inside is the always-current mirror of this instance's state: its users'
  rooms, pool places and matches, and the recent history. Every command updates it, so when
  Redis fails nothing needs fetching: the store just serves from it.
- Healthy (``ok``): matchmaking runs in Redis (one Lua script per command, atomic across
  instances) and its outcome is copied into the mirror; room joins and leaves go to the
  mirror and then to Redis. History goes to the write-behind queue (``redis_writer``).
  Reads ask Redis and merge what is still queued, so a message is readable the moment it
  was delivered (merging beats flushing first: a read never waits for the writer).
- Any Redis failure (down, timeout, auth, ...) flips the store to ``degraded`` (one warning)
  and that call, and every later one, is served from the mirror. Users whose state changes
  meanwhile are noted as dirty; history keeps queueing (bounded, oldest dropped, counted).
- The supervisor task retries with exponential backoff and jitter. On success it rewrites
  the state of every user this instance knows (all of them: Redis may have restarted
  empty, and the dirty ones, who may have left) so Redis matches the mirror, then flushes
  the queue in order, and flips back to ``ok`` (one info line) only when nothing is dirty,
  queued or in flight. While ``ok`` it pings every few seconds, so ``/health`` notices an
  idle Redis dying.
- Calls that change state run shielded from cancellation (bounded by the socket timeouts),
  so the outcome of every command is known and the mirror never disagrees with Redis
  silently; a call whose store went degraded while it waited for a thread is skipped.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Generic, TypeVar

import attrs
import redis
import trio

from aleatoria.config import Config
from aleatoria.errors import StoreUnavailable
from aleatoria.matchmaking import IMPOLITE, RequestOutcome
from aleatoria.store.base import Health
from aleatoria.store.memory import dm_key
from aleatoria.store.redis_client import RedisClient
from aleatoria.store.redis_history import merge_dm, merge_room, read_dm, read_room
from aleatoria.store.redis_mirror import Mirror
from aleatoria.store.redis_scripts import (
    MATCHES_KEY,
    POOL_KEY,
    ROOM_MEMBERS_PREFIX,
    ROOMS_KEY,
    SMALL_POOL,
    USER_ROOMS_PREFIX,
)
from aleatoria.store.redis_writer import DM, DM_PREFIX, ROOM, ROOM_MESSAGES_PREFIX, WriteBehind

log = logging.getLogger("aleatoria.store.redis")

T = TypeVar("T")

_MATCH_KEYS = [POOL_KEY, MATCHES_KEY]
_THREADS = 8
_BATCH = 512
_SYNC_CHUNK = 256
_PROBE_EVERY = 2.0
# The writer lets a batch gather this long: a pipeline costs ~0.2 ms of CPU whatever its
# size, so at chat rates one per message would cost more than the fan-out it follows.
_COALESCE = 0.02
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0
_FLUSH_SECONDS = 5.0
_PURGE_EVERY = 60.0


@attrs.frozen
class _Done(Generic[T]):
    """A Redis command's result; ``stale`` when the store degraded while it ran."""

    value: T
    stale: bool


@attrs.frozen
class RedisMetrics:
    """Figures for /metrics."""

    degraded: bool
    calls: int
    failures: int
    call_seconds: float
    queued: int
    written: int
    dropped: int
    degraded_periods: int


class RedisStore:
    """The ``Store`` on Redis, with the memory mirror as fallback. Use ``open_redis_store``."""

    def __init__(self, config: Config, client: RedisClient, *, rng: random.Random | None = None) -> None:
        self._client = client
        self._scripts = client.scripts
        self._ttl_ns = int(config.message_ttl_seconds * 1e9)
        self._mirror = Mirror(ttl_seconds=config.message_ttl_seconds, history_max=config.history_max)
        self._memory = self._mirror.memory
        self._mm = self._mirror.matchmaker
        self._writer = WriteBehind(
            capacity=config.redis_write_buffer,
            batch=_BATCH,
            ttl_ns=self._ttl_ns,
            history_max=config.history_max,
            scripts=client.scripts,
        )
        self._cap = config.history_max
        self._rng = rng or random.Random()
        self._state: Health = "degraded"
        self._epoch = 0
        self._reason = "not connected yet"
        self._run_id = ""
        self._degraded_at = time.monotonic()
        self._written_mark = 0
        self._dropped_mark = 0
        self._degraded_periods = 0
        self._drop_logged = False
        self._trouble = trio.Event()
        self._healthy = trio.Event()
        self._dirty: set[str] = set()
        self._inflight = 0
        self._idle: trio.Event | None = None

    @property
    def kind(self) -> str:
        return "redis"

    def health(self) -> Health:
        return self._state

    def gauges(self) -> dict[str, tuple[str, float]]:
        """This instance's pool and matches (the mirror), and the Redis figures. The Redis
        ones only grow, except the queue length (the Store protocol has gauges only)."""
        figures = self.metrics()
        gauges = self._memory.gauges()
        gauges.update(
            {
                "aleatoria_redis_calls": ("Redis calls made", figures.calls),
                "aleatoria_redis_call_failures": ("Redis calls that failed", figures.failures),
                "aleatoria_redis_call_seconds": ("seconds spent in Redis calls", figures.call_seconds),
                "aleatoria_redis_write_queue": ("history writes waiting for Redis", figures.queued),
                "aleatoria_redis_writes": ("history writes confirmed by Redis", figures.written),
                "aleatoria_redis_write_drops": (
                    "history writes dropped (buffer full while Redis failed)",
                    figures.dropped,
                ),
                "aleatoria_redis_degraded_periods": (
                    "times the store went degraded",
                    figures.degraded_periods,
                ),
            }
        )
        return gauges

    def metrics(self) -> RedisMetrics:
        client = self._client
        return RedisMetrics(
            degraded=self._state != "ok",
            calls=client.calls,
            failures=client.failures,
            call_seconds=client.call_seconds,
            queued=len(self._writer),
            written=self._writer.written,
            dropped=self._writer.dropped,
            degraded_periods=self._degraded_periods,
        )

    # -- history --------------------------------------------------------------------------

    def record_room_message(self, room: str, message: bytes, created_ns: int) -> None:
        self._memory.record_room_message(room, message, created_ns)
        self._enqueue(ROOM, room, message, created_ns)

    def record_direct_message(self, a: str, b: str, message: bytes, created_ns: int) -> None:
        self._memory.record_direct_message(a, b, message, created_ns)
        first, second = dm_key(a, b)
        self._enqueue(DM, f"{first}:{second}", message, created_ns)

    def _enqueue(self, kind: int, key: str, message: bytes, created_ns: int) -> None:
        if self._writer.add(kind, key, message, created_ns) and not self._drop_logged:
            self._drop_logged = True
            log.warning(
                "event=redis_buffer_full capacity=%d action=dropping_oldest "
                "(counted; logged once until Redis is written again)",
                self._writer.capacity,
            )

    async def recent_room_messages(self, room: str, limit: int, before_ns: int | None = None) -> list[bytes]:
        if self._state == "ok":
            pending = self._writer.pending(ROOM, room)
            cutoff_ns = time.time_ns() - self._ttl_ns
            fetch = partial(
                read_room,
                key=ROOM_MESSAGES_PREFIX + room,
                limit=limit,
                before_ns=before_ns,
                cutoff_ns=cutoff_ns,
                count_newer=bool(pending) and before_ns is not None,
            )
            try:
                rows, newer = await self._client.call(fetch, abandon_on_cancel=True)
            except StoreUnavailable as exc:
                self._degrade(exc)
            else:
                if not pending:
                    return [member for member, _ in rows]
                return merge_room(rows, newer, pending, limit, self._cap, before_ns, cutoff_ns)
        return self._memory.recent_room_messages_now(room, limit, before_ns)

    async def direct_messages(self, a: str, b: str, limit: int) -> list[bytes]:
        if self._state == "ok":
            first, second = dm_key(a, b)
            key = f"{first}:{second}"
            pending = self._writer.pending(DM, key)
            cutoff_ns = time.time_ns() - self._ttl_ns
            try:
                rows = await self._client.call(
                    partial(read_dm, key=DM_PREFIX + key, limit=limit), abandon_on_cancel=True
                )
            except StoreUnavailable as exc:
                self._degrade(exc)
            else:
                return merge_dm(rows, pending, min(limit, self._cap), cutoff_ns)
        return self._memory.direct_messages_now(a, b, limit)

    # -- room registry ----------------------------------------------------------------------

    async def join_room(self, room: str, user: str) -> None:
        await self._mirror.join(room, user)
        keys = [ROOM_MEMBERS_PREFIX + room, USER_ROOMS_PREFIX + user, ROOMS_KEY]
        await self._write_through((user,), partial(self._scripts.join_room, keys, [room, user]))

    async def leave_room(self, room: str, user: str) -> None:
        await self._mirror.leave(room, user)
        keys = [ROOM_MEMBERS_PREFIX + room, USER_ROOMS_PREFIX + user, ROOMS_KEY]
        await self._write_through((user,), partial(self._scripts.leave_room, keys, [room, user]))

    async def rooms(self) -> list[str]:
        if self._state == "ok":
            try:
                names = await self._client.call(
                    partial(self._scripts.rooms, [ROOMS_KEY], []), abandon_on_cancel=True
                )
            except StoreUnavailable as exc:
                self._degrade(exc)
            else:
                return sorted(_text(name) for name in names)
        return await self._memory.rooms()

    # -- matchmaking --------------------------------------------------------------------------

    async def set_available(self, user: str) -> str | None:
        done = await self._run(partial(self._scripts.set_available, _MATCH_KEYS, [user]))
        if done is None:
            ended = self._mm.set_available(user)
            self._dirty.update(_present(user, ended))
            return ended
        ended = _text_or_none(done.value)
        self._mirror.end(user)
        self._mm.set_available(user)
        self._settle(done, user, ended)
        return ended

    async def set_unavailable(self, user: str) -> None:
        self._mm.set_unavailable(user)
        await self._write_through((user,), partial(_srem_pool, user=user))

    async def request_peer(self, user: str, current_peer: str | None) -> RequestOutcome:
        args: list[str | int] = [user, current_peer or "", repr(self._rng.random()), SMALL_POOL]
        done = await self._run(partial(self._scripts.request_peer, _MATCH_KEYS, args))
        if done is None:
            outcome = self._mirror.request_peer(user, current_peer)
            self._dirty.update(_present(user, outcome.peer, outcome.ended_peer))
            return outcome
        kind, peer, role, ended_text = (_text(part) for part in done.value)
        ended = ended_text or None
        if ended is not None:
            self._mirror.end(user)
        if kind == "resend":
            if role == IMPOLITE:
                self._mirror.match(user, peer)
            else:
                self._mirror.match(peer, user)
            outcome = RequestOutcome(peer=peer, role=role, resend=True)
        elif kind == "match":
            self._mirror.match(user, peer)
            outcome = RequestOutcome(peer=peer, role=IMPOLITE, ended_peer=ended)
        else:
            outcome = RequestOutcome(ended_peer=ended)
        self._settle(done, user, outcome.peer, ended)
        return outcome

    async def hangup(self, user: str, peer: str) -> bool:
        done = await self._run(partial(self._scripts.hangup, _MATCH_KEYS, [user, peer]))
        ended = self._mm.hangup(user, peer)
        if done is None:
            if ended:
                self._dirty.update((user, peer))
            return ended
        self._settle(done, user, peer)
        return bool(done.value)

    async def user_gone(self, user: str) -> str | None:
        done = await self._run(partial(self._scripts.user_gone, _MATCH_KEYS, [user]))
        ended = self._mirror.forget(user)
        if done is None:
            self._dirty.update(_present(user, ended))
            return ended
        redis_ended = _text_or_none(done.value)
        self._settle(done, user, redis_ended)
        return redis_ended

    # -- calling Redis ---------------------------------------------------------------------------

    async def _run(self, fn: Callable[[redis.Redis], T]) -> _Done[T] | None:
        """Run a state-changing command if the store is ok; None if it is (or just went)
        degraded, and the caller serves from the mirror. Shielded: the caller always learns
        the outcome (the socket timeouts bound the wait)."""
        if self._state != "ok":
            return None
        epoch = self._epoch
        self._inflight += 1
        try:
            with trio.CancelScope(shield=True):
                value = await self._client.call(fn, gate=self._same_epoch(epoch))
        except StoreUnavailable as exc:
            self._degrade(exc)
            return None
        finally:
            self._inflight -= 1
            if self._inflight == 0 and self._idle is not None:
                self._idle.set()
        return _Done(value, stale=self._epoch != epoch)

    def _same_epoch(self, epoch: int) -> Callable[[], bool]:
        """A gate for calls started in ``epoch``: false once the store degraded since."""
        return lambda: self._epoch == epoch

    async def _write_through(self, users: Iterable[str], fn: Callable[[redis.Redis], Any]) -> None:
        """A command whose effect the mirror already holds: on failure, just note the users."""
        done = await self._run(fn)
        if done is None or done.stale:
            self._dirty.update(users)

    def _settle(self, done: _Done[Any], *users: str | None) -> None:
        # Synchronously after the call: a recovery cannot slip in between.
        if done.stale:
            self._dirty.update(_present(*users))

    # -- degradation and recovery -------------------------------------------------------------

    def _degrade(self, exc: StoreUnavailable) -> None:
        if self._state != "ok":
            return
        self._state = "degraded"
        self._epoch += 1
        self._degraded_periods += 1
        self._reason = str(exc)
        self._degraded_at = time.monotonic()
        self._written_mark = self._writer.written
        self._dropped_mark = self._writer.dropped
        self._healthy = trio.Event()
        self._trouble.set()
        log.warning(
            "event=redis_degraded redis=%s reason=%r action=serving_from_memory queued=%d",
            self._client.url,
            self._reason,
            len(self._writer),
        )

    def _set_ok(self, *, first: bool, synced: int) -> None:
        self._state = "ok"
        self._drop_logged = False
        self._healthy.set()
        if first:
            log.info("event=redis_connected redis=%s", self._client.url)
            return
        log.info(
            "event=redis_recovered redis=%s after=%.1fs users_resynced=%d history_written=%d "
            "history_dropped=%d",
            self._client.url,
            time.monotonic() - self._degraded_at,
            synced,
            self._writer.written - self._written_mark,
            self._writer.dropped - self._dropped_mark,
        )

    async def _recover(self, *, first: bool = False) -> None:
        """Bring Redis in line with the mirror, flush the queue, go ``ok``. Raises
        StoreUnavailable (the store stays degraded; nothing done is lost)."""
        run_id = await self._client.call(self._hello)
        users = self._mirror.known_users() | self._dirty
        self._dirty.clear()
        synced = len(users)
        await self._sync_users(users)
        async with self._writer.lock:
            while True:
                if self._inflight:
                    self._idle = trio.Event()
                    await self._idle.wait()
                elif self._dirty:
                    users = set(self._dirty)
                    self._dirty.clear()
                    synced += len(users)
                    await self._sync_users(users)
                elif len(self._writer):
                    await self._writer.drain(self._client, gate=_always, keep_going=_always)
                else:
                    break
            self._run_id = run_id
            self._set_ok(first=first, synced=synced)  # no checkpoint since the last check

    def _hello(self, r: redis.Redis) -> str:
        """Load the scripts on this Redis; return its run_id (to notice restarts)."""
        self._scripts.load(r)
        return _run_id_of(r)

    async def _sync_users(self, users: set[str]) -> None:
        states = [self._mirror.user_state(user) for user in sorted(users)]
        for start in range(0, len(states), _SYNC_CHUNK):
            chunk = states[start : start + _SYNC_CHUNK]
            try:
                await self._client.call(partial(self._sync_chunk, states=chunk))
            except BaseException:
                self._dirty.update(state[0] for state in states[start:])
                raise

    def _sync_chunk(self, r: redis.Redis, *, states: list[list[str]]) -> None:
        pipe = r.pipeline(transaction=False)
        for state in states:
            keys = [POOL_KEY, MATCHES_KEY, ROOMS_KEY, USER_ROOMS_PREFIX + state[0]]
            self._scripts.sync_user(keys=keys, args=state, client=pipe)
        pipe.execute()

    async def supervise(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, then keep the store healthy forever: probe while ok, retry with
        exponential backoff and jitter while degraded. Reports started after the first
        attempt, whatever its outcome. Cancel to stop."""
        try:
            await self._recover(first=True)
        except StoreUnavailable as exc:
            self._reason = str(exc)
            log.warning(
                "event=redis_unavailable_at_start redis=%s reason=%r action=serving_from_memory "
                "(retrying in the background)",
                self._client.url,
                self._reason,
            )
        task_status.started()
        delay = _BACKOFF_FIRST
        while True:
            if self._state == "ok":
                delay = _BACKOFF_FIRST
                with trio.move_on_after(_PROBE_EVERY):
                    await self._trouble.wait()
                self._trouble = trio.Event()
                if self._state == "ok":
                    epoch = self._epoch
                    try:
                        run_id = await self._client.call(_run_id_of, gate=self._same_epoch(epoch))
                    except StoreUnavailable as exc:
                        self._degrade(exc)
                    else:
                        if run_id != self._run_id:
                            # Restarted between two probes: its state is gone, resync it.
                            self._degrade(StoreUnavailable("Redis restarted (new run_id)"))
                continue
            await trio.sleep(delay * self._rng.uniform(0.5, 1.0))
            delay = min(delay * 2, _BACKOFF_MAX)
            try:
                await self._recover()
            except StoreUnavailable as exc:
                self._reason = str(exc)
                log.debug("event=redis_retry_failed reason=%r next_in<=%.1fs", self._reason, delay)

    async def write_forever(self) -> None:
        """The writer task: drain the queue whenever it has entries and the store is ok."""
        writer = self._writer
        while True:
            await writer.wait()
            if self._state != "ok":
                await self._healthy.wait()
                continue
            if writer.queued < _BATCH:
                await trio.sleep(_COALESCE)
            epoch = self._epoch
            async with writer.lock:
                try:
                    await writer.drain(
                        self._client,
                        gate=self._same_epoch(epoch),
                        keep_going=lambda: self._state == "ok",
                    )
                except StoreUnavailable as exc:
                    self._degrade(exc)
                else:
                    if not len(writer):
                        self._drop_logged = False  # caught up: a new overflow is news again

    async def flush(self) -> None:
        """Write what is queued (at shutdown). Degraded: one recovery attempt. Raises
        nothing; logs what could not be written. Cancellation: stops where it is."""
        try:
            if self._state == "ok":
                async with self._writer.lock:
                    await self._writer.drain(self._client, gate=_always, keep_going=_always)
            else:
                await self._recover()
        except StoreUnavailable as exc:
            self._degrade(exc)
        finally:
            if len(self._writer):
                log.warning(
                    "event=redis_history_not_written count=%d dropped=%d reason=%r",
                    len(self._writer),
                    self._writer.dropped,
                    self._reason,
                )

    def purge_memory(self) -> int:
        return self._memory.purge_expired()


@asynccontextmanager
async def open_redis_store(config: Config, url: str) -> AsyncIterator[RedisStore]:
    """A running RedisStore: connected (or degraded, if Redis cannot be reached in one
    attempt), with its supervisor and writer. On exit the queue is flushed (bounded)."""
    client = RedisClient(
        url,
        connect_timeout=config.redis_connect_timeout,
        call_timeout=config.redis_call_timeout,
        threads=_THREADS,
    )
    try:
        store = RedisStore(config, client)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(store.supervise)
                nursery.start_soon(store.write_forever)
                nursery.start_soon(_purge_forever, store)
                try:
                    yield store
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(_FLUSH_SECONDS, shield=True):
                await store.flush()
    finally:
        client.close()


async def _purge_forever(store: RedisStore) -> None:
    while True:
        await trio.sleep(_PURGE_EVERY)
        store.purge_memory()


# -- Redis calls (run on worker threads) ----------------------------------------------------------


def _run_id_of(r: redis.Redis) -> str:
    info: dict[str, object] = r.info("server")
    return str(info.get("run_id", ""))


def _srem_pool(r: redis.Redis, *, user: str) -> object:
    return r.srem(POOL_KEY, user)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _text_or_none(value: bytes | str | None) -> str | None:
    return None if value is None else _text(value)


def _present(*users: str | None) -> list[str]:
    return [user for user in users if user]


def _always() -> bool:
    return True
