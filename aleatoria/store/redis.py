"""The Redis/Valkey store (PROTOCOL.md section 6): persistence that live traffic never waits on.

How this works.
- A ``MemoryStore`` inside is the always-current mirror of this instance's live state: its
  users' rooms, pool places and matches. Every command updates it, so when Redis fails
  nothing needs fetching: the store just serves from it. It holds no history.
- History. The server keeps no second copy of what Redis holds (PROTOCOL.md section 16):
  while Redis is healthy a message goes only to the write-behind queue (``redis_writer``,
  bounded in entries and bytes), and reads ask Redis and merge what is still queued, so a
  message is readable the moment it was delivered (merging beats flushing first: a read
  never waits for the writer). A direct message's ``on_stored`` (its sender's own copy) is
  called once the pipeline holding it succeeded: what the sender saw is in Redis.
- Healthy (``ok``): matchmaking runs in Redis (one Lua script per command, atomic across
  instances) and its outcome is copied into the mirror; room joins and leaves go to the
  mirror and then to Redis.
- Any Redis failure (down, timeout, auth, ...) flips the store to ``degraded`` (one warning)
  and that call, and every later one, is served from the mirror. Users whose state changes
  meanwhile are noted as dirty. History keeps queueing (bounded, oldest dropped, counted),
  every ``on_stored`` still waiting is called, and new ones are called at once.
- Reads while degraded. An outage history store (a ``MemoryStore`` under the history memory
  budget) is started with every message Redis has not confirmed (in flight or queued), and
  takes every message accepted until Redis is back; reads are served from it alone. So a
  read during an outage returns what this instance accepted and Redis may not have -- the
  recent conversation, including everything said since the outage began -- but not what
  Redis already held: that is the price of holding no second copy, and it comes back with
  Redis. (From the start until Redis is first reached, the store is degraded the same way.)
- The supervisor task retries with exponential backoff and jitter. On success it rewrites
  the state of every user this instance knows (all of them: Redis may have restarted
  empty, and the dirty ones, who may have left) so Redis matches the mirror, then flushes
  the queue in order, and flips back to ``ok`` (one info line) only when nothing is dirty,
  queued or in flight; the outage history is then dropped (Redis holds all of it). While
  ``ok`` it pings every few seconds, so ``/health`` notices an idle Redis dying.
- Calls that change state run shielded from cancellation (bounded by the socket timeouts),
  so the outcome of every command is known and the mirror never disagrees with Redis
  silently; a call whose store went degraded while it waited for a thread is skipped.
  (The state machine, the supervisor and the writer task are ``redis_keeper``'s.)
- Scale-out (PROTOCOL.md section 9, ``redis_presence``, ``redis_bus``): connections are
  registered in presence; a heartbeat task (``redis_heartbeat``) keeps this instance alive
  in Redis and reaps
  dead instances (their users leave pool, presence and rooms; their peers are told through
  ``StoreEvents``); the writer's pipelines also carry the bus's publishes. Recovery
  heartbeats first: an instance that finds it was declared dead meanwhile ends its local
  matches (the reaper told the other sides) before it re-registers its users.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar, cast

import attrs
import orjson
import redis
import redis.cluster
import trio
from redis.commands.core import Script

from aleatoria.config import Config
from aleatoria.errors import StoreUnavailable
from aleatoria.matchmaking import IMPOLITE, RequestOutcome, new_match_id
from aleatoria.safety import Ban
from aleatoria.search import NO_PROFILE, Match, Profile, SearchEvents, SearchOutcome
from aleatoria.store.base import Bus, Counts, Health, StoreEvents, Takeover, Whereabouts
from aleatoria.store.memory import dm_key, microsecond_end, new_instance_id
from aleatoria.store.redis_batch import ScriptCall, Scripted, scripted
from aleatoria.store.redis_bus import RedisBus
from aleatoria.store.redis_client import RedisClient, present, text, text_or_none
from aleatoria.store.redis_heartbeat import Heartbeat
from aleatoria.store.redis_history import (
    merge_dm,
    merge_room,
    merge_room_after,
    read_dm,
    read_room,
    read_room_after,
)
from aleatoria.store.redis_instance import InstanceRegistry
from aleatoria.store.redis_keeper import WRITE_BATCH, Done, RedisKeeper, RedisMetrics
from aleatoria.store.redis_mirror import Mirror
from aleatoria.store.redis_presence import INSTANCE_USERS_PREFIX, INSTANCES_KEY, PRESENCE_KEY
from aleatoria.store.redis_rooms import RoomRegistry
from aleatoria.store.redis_safety import KnownSafety, RedisSafety
from aleatoria.store.redis_scripts import (
    BANS_KEY,
    BLOCKED_BY_PREFIX,
    MATCHES_KEY,
    POOL_KEY,
    POOLED_KEY,
    SMALL_POOL,
    STATS,
    USER_ROOMS_PREFIX,
)
from aleatoria.store.redis_search import TICK_BATCH
from aleatoria.store.redis_writer import DM, DM_PREFIX, ROOM, ROOM_MESSAGES_PREFIX, OnStored, WriteBehind

log = logging.getLogger("aleatoria.store.redis")

T = TypeVar("T")

_MATCH_KEYS = [POOL_KEY, MATCHES_KEY]
_PICK_KEYS = [POOL_KEY, MATCHES_KEY, PRESENCE_KEY, INSTANCES_KEY]
_THREADS = 8
_FLUSH_SECONDS = 5.0
_PURGE_EVERY = 60.0


class RedisStore:
    """The ``Store`` on Redis, with the memory mirror as fallback. Use ``open_redis_store``.

    It holds its parts rather than inheriting them: the ``RedisKeeper`` (ok or degraded,
    recovery, the writer task), the ``Heartbeat``, the ``RedisBus``, the mirror and the
    write-behind queue; the commands below decide, per call, what goes to Redis and what the
    mirror keeps."""

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
        self._rng = rng or random.Random()
        self._rooms = RoomRegistry(client.scripts, cluster=client.cluster)
        registry = InstanceRegistry(
            client.scripts, self._rooms, self._instance, ttl_ms=int(config.presence_ttl * 1000)
        )
        self._user_keys = registry.user_keys
        self._ttl_ns = int(config.message_ttl_seconds * 1e9)
        self._cap = config.history_max
        self._mirror = Mirror(ttl_seconds=config.message_ttl_seconds, history_max=config.history_max)
        self._memory = self._mirror.memory
        self._mm = self._mirror.matchmaker
        self._writer = WriteBehind(
            capacity=config.redis_write_buffer,
            capacity_bytes=config.history_memory_bytes,
            batch=WRITE_BATCH,
            ttl_ns=self._ttl_ns,
            history_max=config.history_max,
            scripts=client.scripts,
        )
        self._bus = RedisBus(
            client,
            self._instance,
            cluster=client.cluster,
            on_queued=self._writer.poke,
            history_mark=self._writer.mark,
        )
        self._keeper = RedisKeeper(
            config,
            client,
            mirror=self._mirror,
            writer=self._writer,
            bus=self._bus,
            registry=registry,
            rng=self._rng,
        )
        self._safety = RedisSafety(self._keeper, self._memory.safety, report_cap=config.report_cap)
        # The search queue (PROTOCOL.md section 12, ``redis_search``): its timings (ms), what
        # this instance's scripts decided and has yet to announce, the local users who searched
        # or pooled with a profile (their queue place and profile go when they leave), and the
        # queue's length as the last tick saw it.
        rules = config.search_rules
        self._search_ms = [
            int(rules.timeout * 1000),
            int(rules.interest_wait * 1000),
            int(rules.cooldown * 1000),
        ]
        self._search_tick = config.search_tick
        self._made_matches: list[Match] = []
        self._timeouts: list[str] = []
        self._profiled: set[str] = set()
        self._pool_profiles: dict[str, str] = {}  # the profiled pooled users' profile JSON
        self._queue_checked = 0  # the keeper's epoch whose recovery was checked for lost searchers
        self._queue_length = 0
        self._wake: Callable[[], None] | None = None
        self._heartbeat = Heartbeat(
            self._keeper,
            registry,
            self._mirror,
            instance=self._instance,
            interval=config.heartbeat_interval,
            rng=self._rng,
        )

    @property
    def kind(self) -> str:
        return "redis"

    @property
    def round_trips(self) -> bool:
        return True

    @property
    def safety(self) -> RedisSafety:
        return self._safety

    async def whereabouts(self, user: str) -> Whereabouts:
        found = await self._keeper.read(partial(_whereabouts, user=user))
        if found is None:
            return self._memory.whereabouts_now(user)
        presence_value, rooms, match = found
        instance = text(presence_value).split("|", 1)[0] if presence_value else None
        peer = text(match).split("|", 1)[0] if match else None
        return Whereabouts(instance is not None, instance, sorted(text(room) for room in rooms), peer)

    @property
    def instance(self) -> str:
        return self._instance

    @property
    def bus(self) -> Bus:
        return self._bus

    @property
    def redis_bus(self) -> RedisBus:
        return self._bus

    @property
    def keeper(self) -> RedisKeeper:
        return self._keeper

    @property
    def heartbeat(self) -> Heartbeat:
        return self._heartbeat

    def attach(self, events: StoreEvents) -> None:
        # The one hand-over after construction (see ``StoreEvents``): the keeper and the
        # heartbeat report to ``events``, the bus hands it what arrives.
        self._keeper.events = events
        self._bus.handler = events
        # Matching in the mirror (while degraded) keeps users apart by what their
        # connections know too: the fallback holds only what was decided during an outage.
        self._mm.filter = KnownSafety(self._memory.safety, events)

    def health(self) -> Health:
        return self._keeper.state

    def metrics(self) -> RedisMetrics:
        return self._keeper.metrics()

    def gauges(self) -> dict[str, tuple[str, float]]:
        """This instance's pool and matches (the mirror), and the Redis figures that go up
        and down (the running totals are ``counters``)."""
        figures = self._keeper.metrics()
        gauges = self._memory.gauges()
        outage = self._keeper.outage
        gauges["aleatoria_history_memory_bytes"] = (
            "bytes of history held in memory (Redis mode: only while degraded; see also the write queue)",
            0 if outage is None else outage.history_bytes,
        )
        gauges["aleatoria_redis_write_queue"] = ("history writes waiting for Redis", figures.queued)
        gauges["aleatoria_search_queue"] = (
            "users in the search queue (all instances, as this instance's last tick saw it)",
            self._queue_length,
        )
        gauges.update(self._bus.gauges())
        return gauges

    def counters(self) -> dict[str, tuple[str, float]]:
        """The Redis figures that only grow (exported with ``_total``)."""
        figures = self._keeper.metrics()
        counters = {
            "aleatoria_redis_calls": ("Redis calls made", figures.calls),
            "aleatoria_redis_call_failures": ("Redis calls that failed", figures.failures),
            "aleatoria_redis_call_seconds": ("seconds spent in Redis calls", figures.call_seconds),
            "aleatoria_redis_writes": ("history writes confirmed by Redis", figures.written),
            "aleatoria_redis_write_drops": (
                "history writes dropped (buffer full while Redis failed)",
                figures.dropped,
            ),
            "aleatoria_redis_degraded_periods": ("times the store went degraded", figures.degraded_periods),
        }
        counters.update(self._bus.counters())
        counters.update(self._heartbeat.counters())
        return counters

    def purge_memory(self) -> int:
        outage = self._keeper.outage
        return self._memory.purge_expired() + (0 if outage is None else outage.purge_expired())

    # -- history --------------------------------------------------------------------------

    def record_room_message(self, room: str, message: bytes, created_ns: int) -> None:
        outage = self._keeper.outage
        if outage is not None:
            outage.record_room_message(room, message, created_ns)
        self._keeper.enqueue(ROOM, room, message, created_ns)

    def record_direct_message(
        self,
        a: str,
        b: str,
        message: bytes,
        created_ns: int,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        first, second = dm_key(a, b)
        outage = self._keeper.outage
        if outage is None:
            self._keeper.enqueue(DM, f"{first}:{second}", message, created_ns, on_stored)
            return
        outage.record_direct_message(a, b, message, created_ns)
        self._keeper.enqueue(DM, f"{first}:{second}", message, created_ns)
        if on_stored is not None:
            on_stored()  # degraded: served from memory now, written later

    def after_stored(self, fn: OnStored) -> None:
        if self._keeper.state != "ok":
            fn()  # degraded: served from memory now, written later
            return
        self._writer.when_written(fn)

    async def recent_room_messages(
        self,
        room: str,
        limit: int,
        before_ns: int | None = None,
        after_ns: int | None = None,
        max_bytes: int | None = None,
    ) -> list[bytes]:
        if after_ns is not None:
            return await self._room_after(room, limit, microsecond_end(after_ns), before_ns, max_bytes)
        if self._keeper.state == "ok":
            pending = self._writer.pending(ROOM, room)
            cutoff_ns = time.time_ns() - self._ttl_ns
            fetch = partial(
                read_room,
                script=self._scripts.room_read,
                key=ROOM_MESSAGES_PREFIX + room,
                limit=limit,
                before_ns=before_ns,
                cutoff_ns=cutoff_ns,
                count_newer=bool(pending) and before_ns is not None,
                max_bytes=max_bytes,
            )
            found = await self._keeper.read(fetch)
            if found is not None:
                rows, newer = found
                if not pending:
                    return [member for member, _ in rows]
                return merge_room(rows, newer, pending, limit, self._cap, before_ns, cutoff_ns)
        outage = self._keeper.outage
        if outage is None:
            return []
        return outage.recent_room_messages_now(room, limit, before_ns, max_bytes=max_bytes)

    async def _room_after(
        self, room: str, limit: int, after_ns: int, before_ns: int | None, max_bytes: int | None
    ) -> list[bytes]:
        """Forward paging (PROTOCOL.md section 15): oldest first, strictly newer than
        ``after_ns``, with what the writer still holds merged in."""
        if self._keeper.state == "ok":
            cutoff_ns = time.time_ns() - self._ttl_ns
            fetch = partial(
                read_room_after,
                script=self._scripts.room_read,
                key=ROOM_MESSAGES_PREFIX + room,
                limit=limit,
                after_ns=after_ns,
                before_ns=before_ns,
                cutoff_ns=cutoff_ns,
                max_bytes=max_bytes,
            )
            rows = await self._keeper.read(fetch)
            if rows is not None:
                pending = self._writer.pending(ROOM, room)
                return merge_room_after(rows, pending, limit, after_ns, before_ns, cutoff_ns)
        outage = self._keeper.outage
        if outage is None:
            return []
        return outage.recent_room_messages_now(room, limit, before_ns, after_ns, max_bytes)

    async def direct_messages(self, a: str, b: str, limit: int, max_bytes: int | None = None) -> list[bytes]:
        if self._keeper.state == "ok":
            first, second = dm_key(a, b)
            key = f"{first}:{second}"
            pending = self._writer.pending(DM, key)
            cutoff_ns = time.time_ns() - self._ttl_ns
            fetch = partial(
                read_dm, script=self._scripts.dm_read, key=DM_PREFIX + key, limit=limit, max_bytes=max_bytes
            )
            rows = await self._keeper.read(fetch)
            if rows is not None:
                return merge_dm(rows, pending, min(limit, self._cap), cutoff_ns)
        outage = self._keeper.outage
        return [] if outage is None else outage.direct_messages_now(a, b, limit)

    # -- room registry ----------------------------------------------------------------------

    async def join_room(self, room: str, user: str) -> None:
        await self._mirror.join(room, user)
        join = partial(self._rooms.join, room=room, user=user, instance=self._instance)
        done = await self._keeper.run(join)
        if done is None or done.stale:
            self._keeper.dirty.add(user)
        elif not done.value:
            # Another instance took the user over meanwhile (a connect of the same user in the
            # same moment) and this connection is being evicted: Redis refused the join, so
            # the mirror forgets it too.
            self._mirror.leave_now(room, user)

    async def leave_room(self, room: str, user: str) -> None:
        await self._mirror.leave(room, user)
        await self._keeper.write_through((user,), partial(self._rooms.leave, room=room, user=user))

    async def rooms(self) -> list[str]:
        rooms = await self._keeper.read(self._rooms.rooms)
        return await self._memory.rooms() if rooms is None else rooms

    # -- directory (reads: this instance's rooms and users alone while degraded) -----------------

    async def list_rooms(self, limit: int, prefix: str = "") -> list[tuple[str, int]]:
        rows = await self._keeper.read(partial(self._rooms.directory, limit=limit, prefix=prefix))
        return self._memory.list_rooms_now(limit, prefix) if rows is None else rows

    async def room_members(self, room: str, limit: int) -> tuple[int, list[str]]:
        found = await self._keeper.read(partial(self._rooms.members, room=room, limit=limit))
        return self._memory.room_members_now(room, limit) if found is None else found

    async def stats(self) -> Counts:
        counts = await self._keeper.read(partial(_census, rooms=self._rooms))
        if counts is not None:
            return counts
        # The mirror's memory store is not told of connections: the mirror knows them.
        return attrs.evolve(self._memory.stats_now(), online=len(self._mirror.online))

    # -- matchmaking --------------------------------------------------------------------------

    async def set_available(self, user: str, profile: Profile = NO_PROFILE) -> str | None:
        pool, data = self._pool_call(user, profile)
        done = await self._keeper.run(Scripted((pool,)))
        if done is None:
            return self._pooled_in_memory(user)
        return self._pooled(user, done, done.value, data)

    def _pool_call(self, user: str, profile: Profile) -> tuple[ScriptCall, str]:
        """The ``available`` script's call for ``user``, and its profile JSON ('' for none)."""
        keys = [*_PICK_KEYS, self._user_keys[3]]
        data = "" if profile.empty else _profile_json(profile)
        args: list[str | int] = [*self._search_ms, new_match_id(), user, self._instance, data]
        return (self._scripts.available, keys, args), data

    def _pooled_in_memory(self, user: str) -> str | None:
        ended = self._mm.set_available(user)
        self._keeper.dirty.update(present(user, ended))
        return ended

    def _pooled(self, user: str, done: Done[Any], value: Any, data: str) -> str | None:
        ended = text_or_none(value[0]) or None
        if user in self._mirror.online:  # not if it moved to another instance meanwhile
            self._mirror.end(user)
            self._mm.set_available(user)
        if data:
            self._profiled.add(user)
            self._pool_profiles[user] = data
        else:
            self._pool_profiles.pop(user, None)
        match = _match(value[1])
        if match is not None:
            self._made(match)
        self._keeper.settle(done, user, ended, *_sides(match))
        return ended

    async def pool_then_request_peer(
        self, user: str, current_peer: str | None, profile: Profile = NO_PROFILE
    ) -> tuple[str | None, RequestOutcome]:
        # Both scripts in one pipeline: Redis runs them back to back, so no other requester
        # can take the user from the pool in between (see ``Session._join_held``).
        pool, _ = self._pool_call(user, NO_PROFILE)
        pick = (self._scripts.request_peer, _PICK_KEYS, self._pick_args(user, current_peer, profile))
        done = await self._keeper.run(Scripted((pool, pick), requester=user, pick=1))
        if done is None:
            ended = self._pooled_in_memory(user)
            return ended, self._requested_in_memory(user, current_peer)
        pooled, picked = done.value
        return self._pooled(user, done, pooled, ""), self._requested(user, done, picked)

    async def set_unavailable(self, user: str) -> None:
        self._mm.set_unavailable(user)
        await self._keeper.write_through((user,), partial(_srem_pool, user=user))
        if user in self._profiled:
            await self.cancel_search(user)

    async def request_peer(
        self, user: str, current_peer: str | None, profile: Profile = NO_PROFILE
    ) -> RequestOutcome:
        args = self._pick_args(user, current_peer, profile)
        pick = Scripted(((self._scripts.request_peer, _PICK_KEYS, args),), requester=user, pick=0)
        done = await self._keeper.run(pick)
        if done is None:
            return self._requested_in_memory(user, current_peer)
        return self._requested(user, done, done.value)

    def _pick_args(self, user: str, current_peer: str | None, profile: Profile) -> list[str | int]:
        return [
            user,
            current_peer or "",
            repr(self._rng.random()),
            SMALL_POOL,
            repr(time.time()),
            "" if profile.empty else _profile_json(profile),
            self._search_ms[2],
            new_match_id(),
        ]

    def _requested_in_memory(self, user: str, current_peer: str | None) -> RequestOutcome:
        outcome = self._mirror.request_peer(user, current_peer)
        self._keeper.dirty.update(present(user, outcome.peer, outcome.ended_peer))
        return outcome

    def _requested(self, user: str, done: Done[Any], values: Any) -> RequestOutcome:
        kind, peer, role, ended_text = (text(part) for part in values[:4])
        match_id = text(values[4]) if len(values) > 4 else ""
        shared = _interests(values, 5)  # a new match's, or a resend's (kept with the match)
        ended = ended_text or None
        if ended is not None:
            self._mirror.end(user)
        if kind == "resend":
            if role == IMPOLITE:
                self._mirror.match(user, peer)
            else:
                self._mirror.match(peer, user)
            outcome = RequestOutcome(peer=peer, role=role, resend=True, match_id=match_id, common=shared)
        elif kind == "match":
            self._mirror.match(user, peer)
            outcome = RequestOutcome(
                peer=peer, role=IMPOLITE, ended_peer=ended, match_id=match_id, common=shared
            )
        else:
            outcome = RequestOutcome(ended_peer=ended)
        self._keeper.settle(done, user, outcome.peer, ended)
        return outcome

    # -- the search queue (PROTOCOL.md section 12; scripts in ``redis_search``) ------------------

    async def search(self, user: str, current_peer: str | None, profile: Profile) -> SearchOutcome:
        profile_json = _profile_json(profile)
        args: list[str | int] = [*self._search_ms, new_match_id(), user, current_peer or "", profile_json]
        done = await self._keeper.run(partial(self._scripts.search, _PICK_KEYS, args))
        if done is None:
            return self._search_here(user, current_peer, profile)
        values = done.value
        if text(values[0]) == "resend":
            peer, role = text(values[1]), text(values[2])
            if role == IMPOLITE:
                self._mirror.match(user, peer)
            else:
                self._mirror.match(peer, user)
            shared = _interests(values, 4)
            resend = RequestOutcome(
                peer=peer, role=role, resend=True, match_id=text(values[3]), common=shared
            )
            return SearchOutcome(profile=profile, resend=resend)
        ended = text(values[1]) or None
        if ended is not None:
            self._mirror.end(user)
        self._mm.set_unavailable(user)
        self._profiled.add(user)
        self._pool_profiles.pop(user, None)  # a searcher now, not pooled
        match = _match(values[4])
        if match is not None:
            self._made(match)
        self._keeper.settle(done, user, ended, *_sides(match))
        return SearchOutcome(
            profile=profile, position=int(values[2]), online=int(values[3]), ended_peer=ended
        )

    def _search_here(self, user: str, current_peer: str | None, profile: Profile) -> SearchOutcome:
        """Degraded: no queue (it lives in Redis); the immediate pick among this instance's
        pooled users, announced like a queue match, or ``no_peer_available`` at once. The
        mirror does not know pooled users' profiles: a searcher with a language, or with
        ``interestsOnly``, gets ``no_peer_available`` rather than a partner breaking its rule."""
        partner = self._mm.peer_of(user)
        if (profile.language is not None or (profile.interests_only and profile.interests)) and (
            partner is None or partner == current_peer
        ):
            if partner is not None:
                self._mirror.end(user)  # "next"
            outcome = RequestOutcome(ended_peer=partner)
        else:
            outcome = self._mirror.request_peer(user, current_peer)
        self._keeper.dirty.update(present(user, outcome.peer, outcome.ended_peer))
        if outcome.resend:
            return SearchOutcome(profile=profile, resend=outcome)
        if outcome.peer is not None:
            self._made(Match(user, outcome.peer, outcome.match_id or new_match_id()))
        else:
            self._timeouts.append(user)
            if self._wake is not None:
                self._wake()
        return SearchOutcome(
            profile=profile, position=1, online=len(self._mirror.online), ended_peer=outcome.ended_peer
        )

    async def cancel_search(self, user: str) -> None:
        self._unprofile(user)
        await self._keeper.write_through((), partial(self._scripts.cancel_search, [POOL_KEY], [user]))

    async def search_events(self) -> SearchEvents:
        # One id for the whole tick: the script names its second match ``<id>-2``, and so on.
        args: list[str | int] = [*self._search_ms, new_match_id(), TICK_BATCH]
        done = await self._keeper.run(partial(self._scripts.search_tick, _PICK_KEYS, args))
        if done is not None:
            self._timeouts += [text(user) for user in done.value[0]]
            self._queue_length = int(done.value[1])
            for made in done.value[2:]:
                match = _match(made)
                if match is not None:
                    self._made(match, wake=False)
                    self._keeper.settle(done, *_sides(match))
            if self._keeper.epoch != self._queue_checked:
                await self._after_recovery()
        for user in self._timeouts:
            self._unprofile(user)
        events = SearchEvents(tuple(self._made_matches), tuple(self._timeouts), self._queue_length)
        self._made_matches = []
        self._timeouts = []
        return events

    def _unprofile(self, user: str) -> None:
        self._profiled.discard(user)
        self._pool_profiles.pop(user, None)

    async def _after_recovery(self) -> None:
        """Redis is back after an outage, and may have lost what only it held (restarted
        empty, or it reaped this instance): this instance's searchers it no longer queues are
        answered as if their search timed out (a red-team run: four searchers queued before a
        restart still waited, unanswered, long past ALEATORIA_SEARCH_TIMEOUT), and its pooled
        users get their profile back (the recovery pools them again without one: a German
        speaker was matched with a French one)."""
        epoch = self._keeper.epoch
        pooled = [
            value
            for user, data in sorted(self._pool_profiles.items())
            if user in self._mirror.online
            for value in (user, data)
        ]
        if pooled:
            restored = await self._keeper.run(partial(self._scripts.restore_profiles, [POOL_KEY], pooled))
            if restored is None:
                return  # degraded again: the next recovery does it
        users = sorted(user for user in self._profiled if user in self._mirror.online)
        if users:
            keys = [POOL_KEY, MATCHES_KEY]
            lost = await self._keeper.read(partial(self._scripts.lost_searchers, keys, users))
            if lost is None:
                return  # degraded again: the next recovery checks
            for user in map(text, lost):
                if user in self._profiled:
                    self._timeouts.append(user)
        self._queue_checked = epoch

    def search_delay(self) -> float | None:
        return self._search_tick

    def on_search_events(
        self, wake: Callable[[], None], announce: Callable[[SearchEvents], None] | None = None
    ) -> None:
        self._wake = wake  # ``announce``: unused (matches end in Redis, not here)

    def _made(self, match: Match, *, wake: bool = True) -> None:
        """A script made ``match``: mirror it if a side is here, announce it."""
        online = self._mirror.online
        if match.impolite in online or match.polite in online:
            self._mirror.match(match.impolite, match.polite)
        self._unprofile(match.impolite)
        self._unprofile(match.polite)
        self._made_matches.append(match)
        if wake and self._wake is not None:
            self._wake()

    def match_peer(self, user: str) -> str | None:
        return self._mm.peer_of(user)

    async def hangup(self, user: str, peer: str) -> bool:
        done = await self._keeper.run(scripted(self._scripts.hangup, _MATCH_KEYS, [user, peer]))
        ended = self._mm.hangup(user, peer)
        if done is None:
            if ended:
                self._keeper.dirty.update((user, peer))
            return ended
        self._keeper.settle(done, user, peer)
        return bool(done.value)

    async def match_between(self, user: str, other: str) -> str | None:
        found = await self._keeper.read(partial(self._match_between, user=user, other=other))
        if found is None:  # degraded: what this instance decided meanwhile
            return self._mm.match_between(user, other) or None
        return text(found) or None

    def _match_between(self, r: redis.Redis, *, user: str, other: str) -> Any:
        return self._scripts.match_between(_MATCH_KEYS, [user, other], r)

    # -- presence ------------------------------------------------------------------------------

    async def connect(self, user: str, connection: str) -> Takeover | None:
        self._mirror.online[user] = connection
        args = [user, self._instance, connection, INSTANCE_USERS_PREFIX]
        keys = [*self._user_keys, BANS_KEY, BLOCKED_BY_PREFIX + user]
        done = await self._keeper.run(scripted(self._scripts.connect, keys, args))
        if done is None:
            self._keeper.dirty.add(user)
            return None
        *head, ban, blockers = done.value
        previous, previous_connection, in_pool, peer, role, queued = (
            text(part) if isinstance(part, bytes | str) else part for part in head
        )
        if (ban or blockers) and self._keeper.events is not None:
            self._safety_at_connect(self._keeper.events, user, text(ban), blockers)
        if self._mirror.online.get(user) == connection:
            self._heartbeat.owned[user] = connection  # registered: the heartbeat checks it stays so
        if not previous or previous == self._instance:
            self._keeper.settle(done, user)
            return None
        rooms: list[str] = []
        try:
            rooms = await self._client.call(partial(self._rooms.user_rooms, user=user))
        except StoreUnavailable as exc:
            self._keeper.degrade(exc)
            self._keeper.dirty.add(user)
        for room in rooms:
            await self._mirror.join(room, user)
        self._mirror.adopt(user, bool(in_pool), peer or None, role)
        if queued:
            # Its search, begun on the other instance, goes on from here: this instance leaves
            # the queue place when the user disconnects (``user_gone``), or the place stayed,
            # counted as searching, until the search timeout.
            self._profiled.add(user)
        self._keeper.settle(done, user, peer or None)
        log.info("event=user_taken_over user=%s from_instance=%s rooms=%d", user, previous, len(rooms))
        return Takeover(previous, previous_connection, tuple(rooms), bool(in_pool), peer or None, role)

    @staticmethod
    def _safety_at_connect(events: StoreEvents, user: str, ban: str, blockers: list[bytes]) -> None:
        """Apply to ``user``'s connection here what ``CONNECT`` read of its safety. A ban or a
        block stored after its handshake's read (``admit``), whose kick or notice went where
        presence named the user before this registration (a resume on this instance of a
        session kept on another, where the kick closed it; a reconnect as it was blocked),
        would otherwise never reach this connection."""
        shadow = False
        if ban:
            found = Ban.from_json(orjson.loads(ban))
            if found.active(time.time()):
                if not found.shadow:
                    log.info("event=banned_at_connect user=%s", user)
                    events.kick(user)
                    return
                shadow = True
        events.safety_at_connect(user, {text(who) for who in blockers}, shadow)

    async def user_gone(
        self, user: str, connection: str | None = None, rooms: Iterable[str] = ()
    ) -> str | None:
        rooms = list(rooms)
        if connection is None or self._mirror.online.get(user) == connection:
            self._mirror.online.pop(user, None)
        if connection is None or self._heartbeat.owned.get(user) == connection:
            self._heartbeat.owned.pop(user, None)
        args = [user, self._instance, connection or ""]
        done = await self._keeper.run(scripted(self._scripts.disconnect, self._user_keys, args))
        if done is not None and not done.value[0]:
            # Registered elsewhere now: the state moved with the user; only forget it here.
            self._mirror.drop(user)
            return None
        for room in rooms:
            await self._mirror.leave(room, user)
        ended = self._mirror.forget(user)
        if done is None:
            self._keeper.dirty.update(present(user, ended))
            return ended
        if rooms:
            pairs = [(room, user) for room in rooms]
            await self._keeper.write_through((user,), partial(self._rooms.leave_many, pairs=pairs))
        redis_ended = text_or_none(done.value[1]) or None
        self._keeper.settle(done, user, redis_ended)
        if user in self._profiled:  # its queue place too (the script took any pool place and profile)
            await self.cancel_search(user)
        return redis_ended

    def user_moved(self, user: str) -> None:
        self._heartbeat.owned.pop(user, None)
        self._mirror.drop(user)
        self._unprofile(user)  # its search, if any, is the new instance's (``connect``)

    # -- matches changed by another instance (the router sees their notices) ---------------------

    def remote_match(self, user: str, peer: str, role: str) -> None:
        self._unprofile(user)
        if user in self._mirror.online:
            self._mirror.adopt(user, False, peer, role)

    def remote_match_ended(self, user: str, peer: str) -> None:
        if self._mm.peer_of(user) == peer:
            self._mirror.end(user)


@asynccontextmanager
async def open_redis_store(config: Config, url: str) -> AsyncIterator[RedisStore]:
    """A running RedisStore: connected (or degraded, if Redis cannot be reached in one
    attempt), with its supervisor and writer. On exit the queue is flushed (bounded)."""
    client = RedisClient(
        url,
        connect_timeout=config.redis_connect_timeout,
        call_timeout=config.redis_call_timeout,
        threads=_THREADS,
        cluster=config.uses_redis_cluster,
    )
    try:
        store = RedisStore(config, client)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(store.redis_bus.run)
                await nursery.start(store.keeper.supervise)
                if store.health() == "ok":
                    # Users connecting now are reachable from other instances at once.
                    with trio.move_on_after(config.redis_connect_timeout):
                        await store.redis_bus.wait_up()
                nursery.start_soon(store.keeper.write_forever)
                nursery.start_soon(store.heartbeat.run_forever)
                nursery.start_soon(store.redis_bus.watch_forever)
                nursery.start_soon(_purge_forever, store)
                try:
                    yield store
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(_FLUSH_SECONDS, shield=True):
                await store.keeper.flush()
    finally:
        client.close()


async def _purge_forever(store: RedisStore) -> None:
    while True:
        await trio.sleep(_PURGE_EVERY)
        store.purge_memory()


# -- Redis calls (run on worker threads) ----------------------------------------------------------


def _srem_pool(r: redis.Redis, *, user: str) -> object:
    pipe = r.pipeline(transaction=False)
    pipe.srem(POOL_KEY, user)
    pipe.zrem(POOLED_KEY, user)
    return pipe.execute()[0]


def _interests(values: Any, index: int) -> tuple[str, ...]:
    """The common interests a script returned at ``index`` (a list; absent: none)."""
    if len(values) > index and isinstance(values[index], list):
        return tuple(text(tag) for tag in values[index])
    return ()


def _profile_json(profile: Profile) -> str:
    return orjson.dumps(profile.to_json()).decode()


def _match(raw: Any) -> Match | None:
    """A match as ``redis_search.make_match`` returns it ({} for none)."""
    if not isinstance(raw, list) or len(raw) < 6:
        return None
    impolite, polite, match_id = (text(part) for part in raw[:3])
    shared, fallback, waited = (raw[i] if isinstance(raw[i], list) else [] for i in (3, 4, 5))
    return Match(
        impolite,
        polite,
        match_id,
        tuple(text(tag) for tag in shared),
        tuple(text(user) for user in fallback),
        tuple(float(text(ms)) / 1000 for ms in waited),
    )


def _sides(match: Match | None) -> tuple[str, ...]:
    return () if match is None else (match.impolite, match.polite)


_STATS = Script(cast(Any, None), STATS.encode())  # bytes: no client needed (see redis_rooms)


def _census(r: redis.Redis, *, rooms: RoomRegistry) -> Counts:
    # Two calls: the rooms live in other cluster slots than presence, pool and matches.
    keys = [PRESENCE_KEY, INSTANCES_KEY, POOL_KEY, MATCHES_KEY]
    online, searching, in_calls = _STATS(keys, [INSTANCE_USERS_PREFIX], r)
    return Counts(online=int(online), searching=int(searching), in_calls=int(in_calls), rooms=rooms.count(r))


def _whereabouts(r: redis.Redis, *, user: str) -> tuple[Any, Any, Any]:
    pipe = r.pipeline(transaction=False)
    pipe.hget(PRESENCE_KEY, user)
    pipe.smembers(USER_ROOMS_PREFIX + user)
    pipe.hget(MATCHES_KEY, user)
    presence_value, rooms, match = pipe.execute()
    return presence_value, rooms, match
