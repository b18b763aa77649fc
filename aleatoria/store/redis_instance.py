"""This instance in Redis: its heartbeat, the reaping of dead instances, and the writes that
(re-)register its users after an outage. Every method here runs on a worker thread (through
``RedisClient.call``) and only talks to Redis; the Redis store decides when to call them and
acts on what they return. The Lua and the key layout are in ``redis_presence``.
"""

from __future__ import annotations

from typing import Any

import attrs
import redis
import redis.cluster

from aleatoria.store.redis_client import Scripts
from aleatoria.store.redis_mirror import UserState
from aleatoria.store.redis_presence import (
    INSTANCE_USERS_PREFIX,
    INSTANCES_KEY,
    PRESENCE_KEY,
    instance_users_key,
)
from aleatoria.store.redis_rooms import RoomRegistry
from aleatoria.store.redis_scripts import MATCHES_KEY, POOL_KEY, ROOMS_KEY, USER_ROOMS_PREFIX

_REAP_KEYS = [POOL_KEY, MATCHES_KEY, INSTANCES_KEY, PRESENCE_KEY]
_REAP_MAX = 16


@attrs.frozen
class Reaped:
    """What one reap removed: dead instances, their users, and the matches that ended as
    (leaver, surviving peer)."""

    instances: list[str]
    users: list[str]
    ended: list[tuple[str, str]]


@attrs.frozen
class Beat:
    """One heartbeat: 'ok', 'lapsed' or 'gone'; Redis' run_id; and what presence said, in
    the same atomic step, of each user asked about (None: absent)."""

    state: str
    run_id: str
    presence: list[str | None]


@attrs.frozen
class Synced:
    """The outcome of re-registering one user (``sync_user``)."""

    user: str
    evict: tuple[str, str] | None = None  # (instance, connection) that must drop the user
    unconfirmed: str | None = None  # the peer whose side did not agree: end the match here
    told: tuple[tuple[str, str], ...] = ()  # (victim, leaver): matches ended, tell the victim


class InstanceRegistry:
    """Redis calls about this instance (see the module doc)."""

    def __init__(self, scripts: Scripts, rooms: RoomRegistry, instance: str, *, ttl_ms: int) -> None:
        self._scripts = scripts
        self._rooms = rooms
        self.instance = instance
        self._ttl_ms = ttl_ms
        # The keys of the scripts about one user: pool, matches, presence, this instance's users.
        self.user_keys = [POOL_KEY, MATCHES_KEY, PRESENCE_KEY, instance_users_key(instance)]

    def heartbeat(self, r: Any) -> str:
        """'ok', 'lapsed' or 'gone' (see ``redis_presence.HEARTBEAT``)."""
        return self._beat(r, [])[0]

    def beat(self, r: Any, *, users: list[str]) -> Beat:
        """The heartbeat with what presence says of ``users`` at that moment, and Redis'
        run_id (a 'gone' after a restart is not a reaping)."""
        state, presence = self._beat(r, users)
        return Beat(state, run_id_of(r), presence)

    def _beat(self, r: Any, users: list[str]) -> tuple[str, list[str | None]]:
        state, *values = self._scripts.heartbeat(
            [INSTANCES_KEY, PRESENCE_KEY], [self.instance, self._ttl_ms, *users], r
        )
        return _text(state), [None if value is None else _text(value) for value in values]

    def reap(self, r: Any) -> Reaped | None:
        dead, gone, ended = self._scripts.reap(
            _REAP_KEYS, [self.instance, INSTANCE_USERS_PREFIX, _REAP_MAX], r
        )
        if not dead:
            return None
        flat = [_text(user) for user in ended]
        return Reaped(
            [_text(d) for d in dead],
            [_text(user) for user in gone],
            list(zip(flat[::2], flat[1::2], strict=True)),
        )

    def forget_rooms(self, r: Any, users: list[str]) -> int:
        """Remove reaped ``users`` from their rooms, except those who connected again."""
        pipe = r.pipeline(transaction=False)
        for user in users:
            pipe.hexists(PRESENCE_KEY, user)
        back = pipe.execute()
        return self._rooms.forget_users(r, [u for u, there in zip(users, back, strict=True) if not there])

    def sync(self, r: Any, states: list[UserState]) -> list[Synced]:
        """Rewrite each user's presence, pool place, match and rooms from ``states``."""
        cluster = self._rooms.cluster
        pipe = r.pipeline(transaction=False)
        for state in states:
            keys = [*self.user_keys]
            args: list[str] = [
                state.user,
                "1" if state.in_pool else "0",
                state.peer,
                state.role,
                self.instance,
                state.connection,
                INSTANCE_USERS_PREFIX,
                "1" if state.peer_here else "0",
            ]
            if cluster:
                args.append("0")
            else:
                keys += [ROOMS_KEY, USER_ROOMS_PREFIX + state.user]
                args += ["1", *state.rooms]
            self._scripts.sync_user(keys=keys, args=args, client=pipe)
        out = []
        for state, reply in zip(states, pipe.execute(), strict=True):
            applied, instance, connection, unconfirmed, *told = (
                _text(part) if isinstance(part, bytes) else part for part in reply
            )
            if applied and cluster:
                self._rooms.sync(r, state.user, list(state.rooms))
            pairs = tuple(zip(told[::2], told[1::2], strict=True))
            out.append(
                Synced(
                    state.user,
                    evict=(instance, connection) if instance else None,
                    unconfirmed=state.peer if unconfirmed else None,
                    told=pairs,
                )
            )
        return out

    def deregister(self, r: Any) -> None:
        """Leave the set of instances at shutdown. Normally every connection has
        deregistered already; if some are left (a cleanup that timed out), leave as a dead
        instance would: expired, so anyone's next reap removes them."""
        if r.scard(instance_users_key(self.instance)):
            r.zadd(INSTANCES_KEY, {self.instance: 0})
        else:
            r.zrem(INSTANCES_KEY, self.instance)


def run_id_of(r: Any) -> str:
    """Redis' run_id (on a cluster: every primary's), to notice a restart."""
    if isinstance(r, redis.cluster.RedisCluster):
        infos = r.info("server", target_nodes=redis.cluster.RedisCluster.PRIMARIES)
        if isinstance(infos, dict) and all(isinstance(v, dict) for v in infos.values()):
            return ",".join(sorted(str(v.get("run_id", "")) for v in infos.values()))
        return str(infos.get("run_id", "")) if isinstance(infos, dict) else ""
    info: dict[str, object] = r.info("server")
    return str(info.get("run_id", ""))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
