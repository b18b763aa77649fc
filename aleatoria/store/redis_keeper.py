"""The Redis store's link to Redis: health, degradation and recovery, the writer, the
heartbeat. ``RedisStore`` (``redis``) adds the ``Store`` commands on top; the "How this
works" of ``aleatoria.store.redis`` describes both.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Generic, TypeVar

import attrs
import redis
import redis.cluster
import trio

from aleatoria.config import Config
from aleatoria.errors import StoreUnavailable
from aleatoria.store.base import Bus, Health, StoreEvents
from aleatoria.store.memory import MemoryStore, new_instance_id
from aleatoria.store.redis_bus import RedisBus
from aleatoria.store.redis_client import RedisClient, present, text
from aleatoria.store.redis_instance import InstanceRegistry, Reaped, Synced, run_id_of
from aleatoria.store.redis_mirror import Mirror
from aleatoria.store.redis_presence import PRESENCE_KEY
from aleatoria.store.redis_rooms import RoomRegistry
from aleatoria.store.redis_writer import DM, ROOM, WriteBehind

log = logging.getLogger("aleatoria.store.redis")

T = TypeVar("T")

_BATCH = 512
_SYNC_CHUNK = 256
_PROBE_EVERY = 2.0
# The writer lets a batch gather this long: a pipeline costs ~0.2 ms of CPU whatever its
# size, so at chat rates one per message would cost more than the fan-out it follows.
_COALESCE = 0.02
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0


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


class RedisKeeper:
    """The state machine behind ``RedisStore``: ``ok`` or ``degraded``, the mirror, the
    write-behind queue, the bus, this instance's registration. Not used on its own."""

    def __init__(
        self,
        config: Config,
        client: RedisClient,
        *,
        rng: random.Random | None = None,
        instance: str | None = None,
    ) -> None:
        self._client = client
        self._scripts = client.scripts
        self._instance = instance or new_instance_id()
        self._rooms = RoomRegistry(client.scripts, cluster=client.cluster)
        self._registry = InstanceRegistry(
            client.scripts, self._rooms, self._instance, ttl_ms=int(config.presence_ttl * 1000)
        )
        self._user_keys = self._registry.user_keys
        self._heartbeat_every = config.heartbeat_interval
        self._reap_grace = config.presence_ttl + config.heartbeat_interval
        self._reap_after = 0.0  # trio time before which this instance reaps nobody
        self._registered = False  # this instance's heartbeat reached Redis at least once
        self._was_reaped = False
        self._events: StoreEvents | None = None
        self._told: list[Callable[[StoreEvents], None]] = []  # to tell once Redis is ok
        self._ttl_ns = int(config.message_ttl_seconds * 1e9)
        self._mirror = Mirror(ttl_seconds=config.message_ttl_seconds, history_max=config.history_max)
        self._memory = self._mirror.memory
        self._mm = self._mirror.matchmaker
        self._writer = WriteBehind(
            capacity=config.redis_write_buffer,
            capacity_bytes=config.history_memory_bytes,
            batch=_BATCH,
            ttl_ns=self._ttl_ns,
            history_max=config.history_max,
            scripts=client.scripts,
        )
        self._cap = config.history_max
        self._history_max = config.history_max
        self._history_budget = config.history_memory_bytes
        # History served from memory while degraded (from the start: not connected yet);
        # None while Redis is healthy (see the "How this works" of ``redis``).
        self._outage: MemoryStore | None = self._new_outage()
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
        self._bus = RedisBus(client, self._instance, cluster=client.cluster)
        self._bus.on_queued = self._writer.poke
        self._bus.history_mark = self._history_mark
        self.reaped_instances = 0
        self.reaped_users = 0
        # Local users whose connection this instance registered in presence (CONNECT
        # answered): user -> connection. The heartbeat checks presence still names them.
        self._owned: dict[str, str] = {}
        self.stale_evictions = 0

    @property
    def kind(self) -> str:
        return "redis"

    @property
    def instance(self) -> str:
        return self._instance

    @property
    def bus(self) -> Bus:
        return self._bus

    @property
    def redis_bus(self) -> RedisBus:
        return self._bus

    def attach(self, events: StoreEvents) -> None:
        self._events = events

    def health(self) -> Health:
        return self._state

    def gauges(self) -> dict[str, tuple[str, float]]:
        """This instance's pool and matches (the mirror), and the Redis figures. The Redis
        ones only grow, except the queue length (the Store protocol has gauges only)."""
        figures = self.metrics()
        gauges = self._memory.gauges()
        outage = self._outage
        gauges["aleatoria_history_memory_bytes"] = (
            "bytes of history held in memory (Redis mode: only while degraded; see also the write queue)",
            0 if outage is None else outage.history_bytes,
        )
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
        gauges.update(self._bus.gauges())
        gauges["aleatoria_reaped_instances"] = ("dead instances this one reaped", self.reaped_instances)
        gauges["aleatoria_reaped_users"] = ("users of dead instances this one reaped", self.reaped_users)
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
            self._dirty.update(present(*users))

    # -- degradation and recovery -------------------------------------------------------------

    def _history_mark(self) -> int:
        return self._writer.added

    def _new_outage(self) -> MemoryStore:
        """History for the outage: whatever Redis has not confirmed yet, then every message
        accepted until Redis is back (a read while degraded returns just that)."""
        outage = MemoryStore(
            ttl_seconds=self._ttl_ns / 1e9, history_max=self._history_max, budget_bytes=self._history_budget
        )
        for kind, key, message, created_ns, _ in self._writer.entries():
            if kind == ROOM:
                outage.record_room_message(key, message, created_ns)
            elif kind == DM:
                first, _, second = key.partition(":")  # ids never hold ":"
                outage.record_direct_message(first, second, message, created_ns)
        return outage

    def _degrade(self, exc: StoreUnavailable) -> None:
        if self._state != "ok":
            return
        self._state = "degraded"
        self._outage = self._new_outage()
        self._epoch += 1
        self._degraded_periods += 1
        self._reason = str(exc)
        self._degraded_at = time.monotonic()
        self._written_mark = self._writer.written
        self._dropped_mark = self._writer.dropped
        self._healthy = trio.Event()
        self._trouble.set()
        self._bus.store_ok = False
        self._bus.fail_all()
        log.warning(
            "event=redis_degraded redis=%s reason=%r action=serving_from_memory queued=%d",
            self._client.url,
            self._reason,
            len(self._writer),
        )
        # Degraded mode serves from memory and writes later: the senders waiting for their
        # messages to be stored get their copies now (section 6's rules, PROTOCOL.md s16).
        self._writer.acknowledge_all()

    def _set_ok(self, *, first: bool, synced: int) -> None:
        self._state = "ok"
        self._outage = None  # Redis holds all of it now
        self._drop_logged = False
        self._healthy.set()
        self._bus.store_recovered()
        told, self._told = self._told, []
        if self._events is not None:
            for tell in told:
                tell(self._events)
        if not first:
            # Other instances may be recovering too: give them a full heartbeat period
            # before anyone whose heartbeat lapsed during the outage counts as dead.
            self._reap_after = trio.current_time() + self._reap_grace
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
        beat = await self._client.call(self._registry.heartbeat)
        if (beat == "gone" and self._registered and run_id == self._run_id) or self._was_reaped:
            self._reaped()
        self._registered = True
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
        return run_id_of(r)

    def _reaped(self) -> None:
        """This instance was declared dead (its heartbeat lapsed) and reaped: its users'
        presence, pool places and matches were removed and their remote peers told. End the
        local matches too, telling the local sides; recovery then re-registers the rest."""
        self._was_reaped = False
        pairs = self._mirror.end_all_matches()
        log.warning(
            "event=instance_was_declared_dead instance=%s action=reregistering matches_ended=%d",
            self._instance,
            len(pairs),
        )
        for user, peer in pairs:
            self._told.append(partial(_tell_peer_left, peer=user, leaver=peer))

    async def _sync_users(self, users: set[str]) -> None:
        states = [self._mirror.user_state(user) for user in sorted(users)]
        for start in range(0, len(states), _SYNC_CHUNK):
            chunk = states[start : start + _SYNC_CHUNK]
            try:
                results = await self._client.call(partial(self._registry.sync, states=chunk))
            except BaseException:
                self._dirty.update(state.user for state in states[start:])
                raise
            for result in results:
                self._synced(result)

    def _synced(self, result: Synced) -> None:
        """Act on one re-registration: the match Redis did not confirm ends here (its local
        side is told), other instances are told whom they lost or must drop."""
        user = result.user
        if result.unconfirmed is not None:
            self._mirror.end(user)
            self._told.append(partial(_tell_peer_left, peer=user, leaver=result.unconfirmed))
        for victim, leaver in result.told:
            self._told.append(partial(_tell_peer_left, peer=victim, leaver=leaver))
        if result.evict is not None:
            instance, connection = result.evict
            self._told.append(partial(_tell_evict, instance=instance, user=user, connection=connection))

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
                        run_id = await self._client.call(run_id_of, gate=self._same_epoch(epoch))
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
        """The writer task: drain the queue and the bus's publishes whenever there are any and
        the store is ok. History alone may gather for ``_COALESCE``; a publish goes at once."""
        writer = self._writer
        bus = self._bus
        while True:
            await writer.wait(bus)
            if self._state != "ok":
                bus.fail_all()
                await self._healthy.wait()
                continue
            if not bus.pending() and not writer.urgent and writer.queued < _BATCH:
                await writer.wait_for_live(bus, _COALESCE)
            epoch = self._epoch
            async with writer.lock:
                try:
                    await writer.drain(
                        self._client,
                        gate=self._same_epoch(epoch),
                        keep_going=lambda: self._state == "ok",
                        live=bus,
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
                    await self._writer.drain(self._client, gate=_always, keep_going=_always, live=self._bus)
            else:
                await self._recover()
            await self._client.call(self._registry.deregister)
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
        outage = self._outage
        return self._memory.purge_expired() + (0 if outage is None else outage.purge_expired())

    # -- heartbeat and reaping -------------------------------------------------------------------

    async def presence_forever(self) -> None:
        """Heartbeat every ``heartbeat_interval`` (with jitter) while ok, and reap dead
        instances. Finding this instance reaped (declared dead while it was alive, e.g. a
        long freeze) degrades the store, and recovery re-registers. Cancel to stop."""
        while True:
            await trio.sleep(self._heartbeat_every * self._rng.uniform(0.8, 1.0))
            if self._state != "ok":
                continue
            epoch = self._epoch
            try:
                beat, run_id = await self._client.call(self._registry.beat, gate=self._same_epoch(epoch))
                if beat == "gone":
                    if run_id != self._run_id:
                        raise StoreUnavailable("Redis restarted (new run_id)")
                    self._was_reaped = True
                    raise StoreUnavailable("this instance was declared dead (heartbeat lapsed)")
                await self._check_owners(epoch)
                if trio.current_time() < self._reap_after:
                    continue
                reaped = await self._client.call(self._registry.reap, gate=self._same_epoch(epoch))
                if reaped is not None:
                    await self._after_reap(reaped)
            except StoreUnavailable as exc:
                self._degrade(exc)

    async def _check_owners(self, epoch: int) -> None:
        """Close local connections that presence no longer names (PROTOCOL.md section 16:
        exactly one live session per user). The eviction notice another instance publishes
        when a user connects there is the fast path; it can be lost (a stalled bus fails its
        queue), so every heartbeat compares presence with the connections this instance
        registered, and evicts the ones replaced elsewhere (or replaced and then gone)."""
        owned = dict(self._owned)  # as registered before the read: a later CONNECT may win
        if not owned or self._events is None:
            return
        users = list(owned)
        values = await self._client.call(partial(_presence_of, users=users), gate=self._same_epoch(epoch))
        for user, value in zip(users, values, strict=True):
            connection = owned[user]
            if self._owned.get(user) != connection:
                continue  # gone or reconnected here since the read
            if value is not None and text(value) == f"{self._instance}|{connection}":
                continue
            del self._owned[user]
            self.stale_evictions += 1
            log.info("event=stale_session_evicted user=%s presence=%s", user, text(value) if value else "")
            self._events.evict(self._instance, user, connection)

    async def _after_reap(self, reaped: Reaped) -> None:
        """Dead instances were reaped by this one: clean their users' rooms, tell the peers."""
        dead, gone, pairs = reaped.instances, reaped.users, reaped.ended
        self.reaped_instances += len(dead)
        self.reaped_users += len(gone)
        for leaver, peer in pairs:
            if self._mm.peer_of(peer) == leaver:
                self._mirror.end(peer)
            if self._events is not None:
                self._events.peer_left(peer, leaver)
        removed = await self._client.call(partial(self._registry.forget_rooms, users=gone)) if gone else 0
        log.warning(
            "event=instances_reaped instances=%s users=%d matches_ended=%d memberships_removed=%d",
            ",".join(dead),
            len(gone),
            len(pairs),
            removed,
        )


def _tell_peer_left(events: StoreEvents, *, peer: str, leaver: str) -> None:
    events.peer_left(peer, leaver)


def _tell_evict(events: StoreEvents, *, instance: str, user: str, connection: str) -> None:
    events.evict(instance, user, connection)


def _presence_of(r: redis.Redis, *, users: list[str]) -> list[Any]:
    values: list[Any] = []
    for start in range(0, len(users), 1000):
        values.extend(r.hmget(PRESENCE_KEY, users[start : start + 1000]))
    return values


def _always() -> bool:
    return True
