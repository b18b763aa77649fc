"""The room registry in Redis: ``room:members:{room}``, ``user:rooms:{user}``, ``rooms:active``.

On a single Redis each command is one Lua script over the three keys (atomic). On a Redis
Cluster those keys live in different slots, so no script may touch them together; the
cluster variant sends the same writes as separate commands in one cluster pipeline
(idempotent set operations) and keeps ``rooms:active`` honest lazily: a leave never removes
the room from the index (a concurrent join could be lost), and ``get_rooms`` drops listed
rooms whose member set is empty, then re-checks each and re-adds any that gained a member
meanwhile (a join adds to the member set before the index, so a join racing the cleanup is
always seen by the re-check).

The rooms directory (``list_rooms``, ``room_members``, the rooms figure of ``get_stats``): on
a single Redis, the sorted set ``rooms:directory`` kept by the same join and leave scripts
(see ``redis_scripts``); on a cluster, ``rooms`` (with its clean-up) and one ``SCARD`` per
listed room, pipelined: O(rooms) per request.
"""

from __future__ import annotations

import heapq
from typing import Any

from redis.commands.core import Script

from aleatoria.store import redis_scripts as lua
from aleatoria.store.base import DIRECTORY_SCAN
from aleatoria.store.redis_client import Scripts
from aleatoria.store.redis_presence import PRESENCE_KEY
from aleatoria.store.redis_scripts import DIRECTORY_KEY, ROOM_MEMBERS_PREFIX, ROOMS_KEY, USER_ROOMS_PREFIX

# The directory's read scripts. Given as bytes, a Script needs no client to compute its SHA;
# they are always called with the client to use, and redis-py loads them on NOSCRIPT.
_NO_CLIENT: Any = None
_LIST_ROOMS = Script(_NO_CLIENT, lua.LIST_ROOMS.encode())
_ROOM_MEMBERS = Script(_NO_CLIENT, lua.ROOM_MEMBERS.encode())


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RoomRegistry:
    """Room membership commands for one Redis (``cluster=False``) or a Redis Cluster.
    Every method takes the redis-py client and runs on a worker thread."""

    def __init__(self, scripts: Scripts, *, cluster: bool) -> None:
        self._scripts = scripts
        self.cluster = cluster

    def join(self, r: Any, room: str, user: str, instance: str) -> bool:
        """Add ``user`` to ``room`` unless another instance than ``instance`` has taken the
        user over (``JOIN_ROOM``); whether it was added. On a cluster presence lives in
        another slot than the room's keys, so the join is not checked there."""
        if not self.cluster:
            keys = [ROOM_MEMBERS_PREFIX + room, USER_ROOMS_PREFIX + user, ROOMS_KEY, DIRECTORY_KEY]
            return bool(self._scripts.join_room([*keys, PRESENCE_KEY], [room, user, instance], r))
        pipe = r.pipeline(transaction=False)
        pipe.sadd(ROOM_MEMBERS_PREFIX + room, user)
        pipe.sadd(USER_ROOMS_PREFIX + user, room)
        pipe.sadd(ROOMS_KEY, room)
        pipe.execute()
        return True

    def leave(self, r: Any, room: str, user: str) -> None:
        self.leave_many(r, [(room, user)])

    def leave_many(self, r: Any, pairs: list[tuple[str, str]]) -> None:
        if not pairs:
            return
        pipe = r.pipeline(transaction=False)
        for room, user in pairs:
            if self.cluster:
                pipe.srem(ROOM_MEMBERS_PREFIX + room, user)
                pipe.srem(USER_ROOMS_PREFIX + user, room)
            else:
                keys = [ROOM_MEMBERS_PREFIX + room, USER_ROOMS_PREFIX + user, ROOMS_KEY, DIRECTORY_KEY]
                self._scripts.leave_room(keys, [room, user], pipe)
        pipe.execute()

    def rooms(self, r: Any) -> list[str]:
        """Rooms that have members, sorted."""
        if not self.cluster:
            return sorted(_text(name) for name in self._scripts.rooms([ROOMS_KEY], [], r))
        listed = sorted(_text(name) for name in r.smembers(ROOMS_KEY))
        if not listed:
            return []
        exists = self._exists(r, listed)
        empty = [room for room, there in zip(listed, exists, strict=True) if not there]
        if empty:
            r.srem(ROOMS_KEY, *empty)
            again = self._exists(r, empty)
            back = [room for room, there in zip(empty, again, strict=True) if there]
            if back:
                r.sadd(ROOMS_KEY, *back)
        return [room for room, there in zip(listed, exists, strict=True) if there]

    def directory(self, r: Any, limit: int, prefix: str = "") -> list[tuple[str, int]]:
        """Up to ``limit`` rooms with members whose names start with ``prefix``, as (room,
        member count): most members first, then by name."""
        if not self.cluster:
            rows = _LIST_ROOMS([DIRECTORY_KEY, ROOMS_KEY], [limit, prefix, DIRECTORY_SCAN], r)
            return [(_text(rows[i]), -int(float(rows[i + 1]))) for i in range(0, len(rows), 2)]
        listed = [room for room in self.rooms(r) if room.startswith(prefix)]
        counted = zip(listed, self._counts(r, listed), strict=True)
        best = heapq.nsmallest(limit, ((-count, room) for room, count in counted if count))
        return [(room, -negative) for negative, room in best]

    def members(self, r: Any, room: str, limit: int) -> tuple[int, list[str]]:
        """How many members ``room`` has, and up to ``limit`` of them, sorted."""
        count, members = _ROOM_MEMBERS([ROOM_MEMBERS_PREFIX + room], [limit], r)
        return int(count), sorted(_text(member) for member in members)

    def count(self, r: Any) -> int:
        """How many rooms have members."""
        if not self.cluster:
            return int(r.scard(ROOMS_KEY))
        return len(self.rooms(r))

    def _counts(self, r: Any, rooms: list[str]) -> list[int]:
        pipe = r.pipeline(transaction=False)
        for room in rooms:
            pipe.scard(ROOM_MEMBERS_PREFIX + room)
        return [int(n) for n in pipe.execute()]

    def _exists(self, r: Any, rooms: list[str]) -> list[bool]:
        pipe = r.pipeline(transaction=False)
        for room in rooms:
            pipe.exists(ROOM_MEMBERS_PREFIX + room)
        return [bool(n) for n in pipe.execute()]

    def user_rooms(self, r: Any, user: str) -> list[str]:
        return sorted(_text(room) for room in r.smembers(USER_ROOMS_PREFIX + user))

    def sync(self, r: Any, user: str, rooms: list[str]) -> None:
        """Make Redis list exactly ``rooms`` for ``user`` (cluster recovery; the single-Redis
        recovery does this inside ``sync_user``)."""
        current = set(self.user_rooms(r, user))
        wanted = set(rooms)
        self.leave_many(r, [(room, user) for room in sorted(current - wanted)])
        for room in sorted(wanted - current):
            self.join(r, room, user, "")  # a cluster: no presence check

    def forget_users(self, r: Any, users: list[str]) -> int:
        """Remove ``users`` (reaped: dead instance) from every room; returns how many
        memberships were removed."""
        if not users:
            return 0
        pipe = r.pipeline(transaction=False)
        for user in users:
            pipe.smembers(USER_ROOMS_PREFIX + user)
        pairs = [
            (_text(room), user)
            for user, rooms in zip(users, pipe.execute(), strict=True)
            for room in sorted(rooms)
        ]
        self.leave_many(r, pairs)
        return len(pairs)
