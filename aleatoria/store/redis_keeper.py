"""The Redis store's link to Redis: ``ok`` or ``degraded``, recovery, the writer task.

``RedisStore`` (``redis``) holds one ``RedisKeeper`` and asks it before every Redis call;
the heartbeat (``redis_heartbeat``) holds it too. The "How this works" of
``aleatoria.store.redis`` describes the rules; this is where they run:

- ``run`` (state-changing commands, shielded) and ``read`` (reads) make a call only while
  ``ok``; a failure degrades the store (``degrade``: one warning, publishes failed, waiting
  senders acknowledged, an outage history started) and the caller serves from the mirror.
- ``supervise`` probes while ``ok`` and retries with backoff while degraded; ``_recover``
  heartbeats, rewrites every known user from the mirror, flushes the write-behind queue and
  flips to ``ok`` only with nothing dirty, queued or in flight.
- ``write_forever`` drains the queue (and the bus's publishes) while ``ok``.
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
import trio

from aleatoria.config import Config
from aleatoria.errors import StoreUnavailable
from aleatoria.store.base import Health, StoreEvents
from aleatoria.store.memory import MemoryStore
from aleatoria.store.redis_bus import RedisBus
from aleatoria.store.redis_client import RedisClient, present
from aleatoria.store.redis_instance import InstanceRegistry, Synced, run_id_of
from aleatoria.store.redis_mirror import Mirror
from aleatoria.store.redis_writer import DM, ROOM, OnStored, WriteBehind

log = logging.getLogger("aleatoria.store.redis")

T = TypeVar("T")

WRITE_BATCH = 512
_SYNC_CHUNK = 256
_PROBE_EVERY = 2.0
# The writer lets a batch gather this long: a pipeline costs ~0.2 ms of CPU whatever its
# size, so at chat rates one per message would cost more than the fan-out it follows.
_COALESCE = 0.02
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0


@attrs.frozen
class Done(Generic[T]):
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
    """The state machine behind ``RedisStore``. Built by it, with the parts it shares: the
    client, the mirror, the write-behind queue, the bus and this instance's registry."""

    def __init__(
        self,
        config: Config,
        client: RedisClient,
        *,
        mirror: Mirror,
        writer: WriteBehind,
        bus: RedisBus,
        registry: InstanceRegistry,
        rng: random.Random,
    ) -> None:
        self.client = client
        self._mirror = mirror
        self._writer = writer
        self._bus = bus
        self._registry = registry
        self._rng = rng
        self._ttl_seconds = config.message_ttl_seconds
        self._history_max = config.history_max
        self._history_budget = config.history_memory_bytes
        self.state: Health = "degraded"
        self.epoch = 0  # +1 each time the store degrades: calls of an older epoch are stale
        # History served from memory while degraded (from the start: not connected yet);
        # None while Redis is healthy (see the "How this works" of ``redis``).
        self.outage: MemoryStore | None = self._new_outage()
        self.dirty: set[str] = set()  # users whose state Redis may not have
        # Where to report what happened to this instance's users (the router; ``attach``).
        self.events: StoreEvents | None = None
        self._told: list[Callable[[StoreEvents], None]] = []  # to tell once Redis is ok
        # The heartbeat's: when it may reap again after a recovery, and whether it found
        # this instance declared dead (recovery then ends the local matches).
        self.reap_after = 0.0
        self.was_reaped = False
        self._registered = False  # this instance's heartbeat reached Redis at least once
        self._reason = "not connected yet"
        self._run_id = ""
        self._degraded_at = time.monotonic()
        self._written_mark = 0
        self._dropped_mark = 0
        self._degraded_periods = 0
        self._drop_logged = False
        self._trouble = trio.Event()
        self._healthy = trio.Event()
        self._inflight = 0
        self._idle: trio.Event | None = None
        self._reap_grace = config.presence_ttl + config.heartbeat_interval

    def metrics(self) -> RedisMetrics:
        client = self.client
        return RedisMetrics(
            degraded=self.state != "ok",
            calls=client.calls,
            failures=client.failures,
            call_seconds=client.call_seconds,
            queued=len(self._writer),
            written=self._writer.written,
            dropped=self._writer.dropped,
            degraded_periods=self._degraded_periods,
        )

    # -- calling Redis ---------------------------------------------------------------------------

    async def run(self, fn: Callable[[redis.Redis], T]) -> Done[T] | None:
        """Run a state-changing command if the store is ok; None if it is (or just went)
        degraded, and the caller serves from the mirror. Shielded: the caller always learns
        the outcome (the socket timeouts bound the wait)."""
        if self.state != "ok":
            return None
        epoch = self.epoch
        self._inflight += 1
        try:
            with trio.CancelScope(shield=True):
                value = await self.client.call(fn, gate=self.gate(epoch))
        except StoreUnavailable as exc:
            self.degrade(exc)
            return None
        finally:
            self._inflight -= 1
            if self._inflight == 0 and self._idle is not None:
                self._idle.set()
        return Done(value, stale=self.epoch != epoch)

    async def read(self, fn: Callable[[redis.Redis], T]) -> T | None:
        """Run a read if the store is ok; None if it is (or just went) degraded, and the
        caller serves from memory. Cancellation abandons the call (a read changes nothing)."""
        if self.state != "ok":
            return None
        try:
            return await self.client.call(fn, abandon_on_cancel=True)
        except StoreUnavailable as exc:
            self.degrade(exc)
            return None

    def gate(self, epoch: int) -> Callable[[], bool]:
        """A gate for calls started in ``epoch``: false once the store degraded since."""
        return lambda: self.epoch == epoch

    async def write_through(self, users: Iterable[str], fn: Callable[[redis.Redis], Any]) -> None:
        """A command whose effect the mirror already holds: on failure, just note the users."""
        done = await self.run(fn)
        if done is None or done.stale:
            self.dirty.update(users)

    def settle(self, done: Done[Any], *users: str | None) -> None:
        """After a command: if the store degraded while it ran, Redis may not have its
        outcome. Synchronously after the call, so a recovery cannot slip in between."""
        if done.stale:
            self.dirty.update(present(*users))

    def tell(self, fn: Callable[[StoreEvents], None]) -> None:
        """Tell the router something once Redis is ok again (after the recovery's rewrite)."""
        self._told.append(fn)

    # -- history -------------------------------------------------------------------------------

    def enqueue(
        self, kind: int, key: str, message: bytes, created_ns: int, on_stored: OnStored | None = None
    ) -> None:
        """Queue a history write (never blocks); an overflow is logged once per episode."""
        if self._writer.add(kind, key, message, created_ns, on_stored) and not self._drop_logged:
            self._drop_logged = True
            log.warning(
                "event=redis_buffer_full capacity=%d capacity_bytes=%s action=dropping_oldest "
                "(counted; logged once until Redis is written again)",
                self._writer.capacity,
                self._writer.capacity_bytes,
            )

    def _new_outage(self) -> MemoryStore:
        """History for the outage: whatever Redis has not confirmed yet, then every message
        accepted until Redis is back (a read while degraded returns just that)."""
        outage = MemoryStore(
            ttl_seconds=self._ttl_seconds, history_max=self._history_max, budget_bytes=self._history_budget
        )
        for kind, key, message, created_ns, _ in self._writer.entries():
            if kind == ROOM:
                outage.record_room_message(key, message, created_ns)
            elif kind == DM:
                first, _, second = key.partition(":")  # ids never hold ":"
                outage.record_direct_message(first, second, message, created_ns)
        return outage

    # -- degradation and recovery -------------------------------------------------------------

    def degrade(self, exc: StoreUnavailable) -> None:
        """Redis failed: serve from memory from now on, until ``supervise`` recovers."""
        if self.state != "ok":
            return
        self.state = "degraded"
        self.outage = self._new_outage()
        self.epoch += 1
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
            self.client.url,
            self._reason,
            len(self._writer),
        )
        # Degraded mode serves from memory and writes later: the senders waiting for their
        # messages to be stored get their copies now (section 6's rules, PROTOCOL.md s16).
        self._writer.acknowledge_all()

    def _set_ok(self, *, first: bool, synced: int) -> None:
        self.state = "ok"
        self.outage = None  # Redis holds all of it now
        self._drop_logged = False
        self._healthy.set()
        self._bus.store_recovered()
        told, self._told = self._told, []
        if self.events is not None:
            for tell in told:
                tell(self.events)
        if not first:
            # Other instances may be recovering too: give them a full heartbeat period
            # before anyone whose heartbeat lapsed during the outage counts as dead.
            self.reap_after = trio.current_time() + self._reap_grace
        if first:
            log.info("event=redis_connected redis=%s", self.client.url)
            return
        log.info(
            "event=redis_recovered redis=%s after=%.1fs users_resynced=%d history_written=%d "
            "history_dropped=%d",
            self.client.url,
            time.monotonic() - self._degraded_at,
            synced,
            self._writer.written - self._written_mark,
            self._writer.dropped - self._dropped_mark,
        )

    async def _recover(self, *, first: bool = False) -> None:
        """Bring Redis in line with the mirror, flush the queue, go ``ok``. Raises
        StoreUnavailable (the store stays degraded; nothing done is lost)."""
        run_id = await self.client.call(self._hello)
        beat = await self.client.call(self._registry.heartbeat)
        if (beat == "gone" and self._registered and run_id == self._run_id) or self.was_reaped:
            self._reaped()
        self._registered = True
        users = self._mirror.known_users() | self.dirty
        self.dirty.clear()
        synced = len(users)
        await self._sync_users(users)
        async with self._writer.lock:
            while True:
                if self._inflight:
                    self._idle = trio.Event()
                    await self._idle.wait()
                elif self.dirty:
                    users = set(self.dirty)
                    self.dirty.clear()
                    synced += len(users)
                    await self._sync_users(users)
                elif len(self._writer):
                    await self._writer.drain(self.client, gate=_always, keep_going=_always)
                else:
                    break
            self._run_id = run_id
            self._set_ok(first=first, synced=synced)  # no checkpoint since the last check

    def _hello(self, r: redis.Redis) -> str:
        """Load the scripts on this Redis; return its run_id (to notice restarts)."""
        self.client.scripts.load(r)
        return run_id_of(r)

    def _reaped(self) -> None:
        """This instance was declared dead (its heartbeat lapsed) and reaped: its users'
        presence, pool places and matches were removed and their remote peers told. End the
        local matches too, telling the local sides; recovery then re-registers the rest."""
        self.was_reaped = False
        pairs = self._mirror.end_all_matches()
        log.warning(
            "event=instance_was_declared_dead instance=%s action=reregistering matches_ended=%d",
            self._bus.instance,
            len(pairs),
        )
        for user, peer in pairs:
            self.tell(partial(_tell_peer_left, peer=user, leaver=peer))

    async def _sync_users(self, users: set[str]) -> None:
        states = [self._mirror.user_state(user) for user in sorted(users)]
        for start in range(0, len(states), _SYNC_CHUNK):
            chunk = states[start : start + _SYNC_CHUNK]
            try:
                results = await self.client.call(partial(self._registry.sync, states=chunk))
            except BaseException:
                self.dirty.update(state.user for state in states[start:])
                raise
            for result in results:
                self._synced(result)

    def _synced(self, result: Synced) -> None:
        """Act on one re-registration: the match Redis did not confirm ends here (its local
        side is told), other instances are told whom they lost or must drop."""
        user = result.user
        if result.unconfirmed is not None:
            self._mirror.end(user)
            self.tell(partial(_tell_peer_left, peer=user, leaver=result.unconfirmed))
        for victim, leaver in result.told:
            self.tell(partial(_tell_peer_left, peer=victim, leaver=leaver))
        if result.evict is not None:
            instance, connection = result.evict
            self.tell(partial(_tell_evict, instance=instance, user=user, connection=connection))

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
                self.client.url,
                self._reason,
            )
        task_status.started()
        delay = _BACKOFF_FIRST
        while True:
            if self.state == "ok":
                delay = _BACKOFF_FIRST
                with trio.move_on_after(_PROBE_EVERY):
                    await self._trouble.wait()
                self._trouble = trio.Event()
                if self.state == "ok":
                    epoch = self.epoch
                    try:
                        run_id = await self.client.call(run_id_of, gate=self.gate(epoch))
                    except StoreUnavailable as exc:
                        self.degrade(exc)
                    else:
                        if run_id != self._run_id:
                            # Restarted between two probes: its state is gone, resync it.
                            self.degrade(StoreUnavailable("Redis restarted (new run_id)"))
                continue
            await trio.sleep(delay * self._rng.uniform(0.5, 1.0))
            delay = min(delay * 2, _BACKOFF_MAX)
            try:
                await self._recover()
            except StoreUnavailable as exc:
                self._reason = str(exc)
                log.debug("event=redis_retry_failed reason=%r next_in<=%.1fs", self._reason, delay)

    def is_current(self, run_id: str) -> bool:
        """Whether ``run_id`` is the Redis this instance registered with (not a restart)."""
        return run_id == self._run_id

    # -- the writer ------------------------------------------------------------------------------

    async def write_forever(self) -> None:
        """The writer task: drain the queue and the bus's publishes whenever there are any and
        the store is ok. History alone may gather for ``_COALESCE``; a publish goes at once."""
        writer = self._writer
        bus = self._bus
        while True:
            await writer.wait(bus)
            if self.state != "ok":
                bus.fail_all()
                await self._healthy.wait()
                continue
            if not bus.pending() and not writer.urgent and writer.queued < WRITE_BATCH:
                await writer.wait_for_live(bus, _COALESCE)
            epoch = self.epoch
            async with writer.lock:
                try:
                    await writer.drain(
                        self.client,
                        gate=self.gate(epoch),
                        keep_going=lambda: self.state == "ok",
                        live=bus,
                    )
                except StoreUnavailable as exc:
                    self.degrade(exc)
                else:
                    if not len(writer):
                        self._drop_logged = False  # caught up: a new overflow is news again

    async def flush(self) -> None:
        """Write what is queued (at shutdown). Degraded: one recovery attempt. Raises
        nothing; logs what could not be written. Cancellation: stops where it is."""
        try:
            if self.state == "ok":
                async with self._writer.lock:
                    await self._writer.drain(self.client, gate=_always, keep_going=_always, live=self._bus)
            else:
                await self._recover()
            await self.client.call(self._registry.deregister)
        except StoreUnavailable as exc:
            self.degrade(exc)
        finally:
            if len(self._writer):
                log.warning(
                    "event=redis_history_not_written count=%d dropped=%d reason=%r",
                    len(self._writer),
                    self._writer.dropped,
                    self._reason,
                )


def _tell_peer_left(events: StoreEvents, *, peer: str, leaver: str) -> None:
    events.peer_left(peer, leaver)


def _tell_evict(events: StoreEvents, *, instance: str, user: str, connection: str) -> None:
    events.evict(instance, user, connection)


def _always() -> bool:
    return True
