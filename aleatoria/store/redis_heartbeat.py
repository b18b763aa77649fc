"""This instance's heartbeat in Redis (PROTOCOL.md section 9: no ghosts), and the reaping of
instances whose heartbeat lapsed.

How this works. While the store is ``ok``, every ``heartbeat_interval`` (with jitter) one
atomic call renews this instance's entry and reads what presence says of the local
connections; those presence no longer names are closed (``_evict_stale``). The read is in
the beat's own step because a reap of this instance between the two would make its own
users look replaced, and they would be closed instead of re-registered. Then dead
instances are reaped: their users leave pool, presence and rooms, and the peers of their
matches are told (``StoreEvents.peer_left``). Finding this instance itself declared dead (a
long freeze) degrades the store; the keeper's recovery then ends the local matches and
re-registers everyone. After a recovery nobody is reaped for a full heartbeat period
(``RedisKeeper.reap_after``): other instances may be recovering too.
"""

from __future__ import annotations

import logging
import random
from functools import partial

import trio

from aleatoria.errors import StoreUnavailable
from aleatoria.store.redis_instance import InstanceRegistry, Reaped
from aleatoria.store.redis_keeper import RedisKeeper
from aleatoria.store.redis_mirror import Mirror

log = logging.getLogger("aleatoria.store.redis")


class Heartbeat:
    """The heartbeat task and what it keeps: the connections this instance registered."""

    def __init__(
        self,
        keeper: RedisKeeper,
        registry: InstanceRegistry,
        mirror: Mirror,
        *,
        instance: str,
        interval: float,
        rng: random.Random,
    ) -> None:
        self._keeper = keeper
        self._registry = registry
        self._mirror = mirror
        self._instance = instance
        self._interval = interval
        self._rng = rng
        # Local users whose connection this instance registered in presence (CONNECT
        # answered): user -> connection. Each beat checks presence still names them.
        self.owned: dict[str, str] = {}
        self.reaped_instances = 0
        self.reaped_users = 0
        self.stale_evictions = 0

    def counters(self) -> dict[str, tuple[str, float]]:
        """Running totals (exported with ``_total``)."""
        return {
            "aleatoria_reaped_instances": ("dead instances this one reaped", self.reaped_instances),
            "aleatoria_reaped_users": ("users of dead instances this one reaped", self.reaped_users),
        }

    async def run_forever(self) -> None:
        """Heartbeat every ``interval`` (with jitter) while ok, and reap dead instances.
        Finding this instance reaped (declared dead while it was alive, e.g. a long freeze)
        degrades the store, and recovery re-registers. Cancel to stop."""
        keeper = self._keeper
        while True:
            await trio.sleep(self._interval * self._rng.uniform(0.8, 1.0))
            if keeper.state != "ok":
                continue
            epoch = keeper.epoch
            # As registered before the beat: a later CONNECT may win.
            owned = dict(self.owned) if keeper.events is not None else {}
            try:
                beat = await keeper.client.call(
                    partial(self._registry.beat, users=list(owned)), gate=keeper.gate(epoch)
                )
                if beat.state == "gone":
                    if not keeper.is_current(beat.run_id):
                        raise StoreUnavailable("Redis restarted (new run_id)")
                    keeper.was_reaped = True
                    raise StoreUnavailable("this instance was declared dead (heartbeat lapsed)")
                self._evict_stale(owned, beat.presence)
                if trio.current_time() < keeper.reap_after:
                    continue
                reaped = await keeper.client.call(self._registry.reap, gate=keeper.gate(epoch))
                if reaped is not None:
                    await self._after_reap(reaped)
            except StoreUnavailable as exc:
                keeper.degrade(exc)

    def _evict_stale(self, owned: dict[str, str], presence: list[str | None]) -> None:
        """Close local connections that presence no longer names (PROTOCOL.md section 16:
        exactly one live session per user). The eviction notice another instance publishes
        when a user connects there is the fast path; it can be lost (a stalled bus fails its
        queue), so every heartbeat compares presence with the connections this instance
        registered (``owned``, read in the beat's own atomic step: see ``HEARTBEAT``), and
        evicts the ones replaced elsewhere (or replaced and then gone)."""
        events = self._keeper.events
        if events is None:
            return
        for (user, connection), value in zip(owned.items(), presence, strict=True):
            if self.owned.get(user) != connection:
                continue  # gone or reconnected here since the beat
            if value == f"{self._instance}|{connection}":
                continue
            del self.owned[user]
            self.stale_evictions += 1
            log.info("event=stale_session_evicted user=%s presence=%s", user, value or "")
            events.evict(self._instance, user, connection)

    async def _after_reap(self, reaped: Reaped) -> None:
        """Dead instances were reaped by this one: clean their users' rooms, tell the peers."""
        dead, gone, pairs = reaped.instances, reaped.users, reaped.ended
        self.reaped_instances += len(dead)
        self.reaped_users += len(gone)
        events = self._keeper.events
        for leaver, peer in pairs:
            if self._mirror.matchmaker.peer_of(peer) == leaver:
                self._mirror.end(peer)
            if events is not None:
                events.peer_left(peer, leaver)
        forget = partial(self._registry.forget_rooms, users=gone)
        removed = await self._keeper.client.call(forget) if gone else 0
        log.warning(
            "event=instances_reaped instances=%s users=%d matches_ended=%d memberships_removed=%d",
            ",".join(dead),
            len(gone),
            len(pairs),
            removed,
        )
