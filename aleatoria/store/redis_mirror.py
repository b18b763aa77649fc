"""The Redis store's local mirror: this instance's live state, always current.

A ``MemoryStore`` plus what recovery needs to rewrite Redis from it: which rooms each local
user is in (the reverse of the room registry), the role of each side of a match (the
``Matchmaker`` keeps roles private) and each local user's connection id (presence). While
Redis is healthy the mirror copies every outcome Redis decided; while it is degraded the
mirror decides, as the memory store would. A match with a user on another instance is held
here too (both sides), so recovery rewrites it whole; recovery never touches the state of a
user another instance has registered. It holds no history: the store keeps that in Redis
(and, only while Redis fails, in a separate outage store; see ``redis``).
"""

from __future__ import annotations

import attrs

from aleatoria.matchmaking import IMPOLITE, POLITE, RequestOutcome
from aleatoria.store.memory import MemoryStore


@attrs.frozen
class UserState:
    """One user as this instance knows it (for the recovery's ``sync_user``)."""

    user: str
    in_pool: bool
    peer: str  # '' for none
    role: str
    connection: str  # '' when not connected here
    peer_here: bool  # the peer is connected to this instance
    rooms: tuple[str, ...]


class Mirror:
    """This instance's rooms, pool places and matches (no history: see ``redis``)."""

    def __init__(self, *, ttl_seconds: float, history_max: int) -> None:
        self.memory = MemoryStore(ttl_seconds=ttl_seconds, history_max=history_max)
        self.matchmaker = self.memory.matchmaker
        self._user_rooms: dict[str, set[str]] = {}
        self._roles: dict[str, str] = {}
        self.online: dict[str, str] = {}  # local user -> connection id

    # -- rooms ----------------------------------------------------------------------------

    async def join(self, room: str, user: str) -> None:
        await self.memory.join_room(room, user)
        self._user_rooms.setdefault(user, set()).add(room)

    async def leave(self, room: str, user: str) -> None:
        self.leave_now(room, user)

    def leave_now(self, room: str, user: str) -> None:
        self.memory.leave_room_now(room, user)
        rooms = self._user_rooms.get(user)
        if rooms is not None:
            rooms.discard(room)
            if not rooms:
                del self._user_rooms[user]

    # -- matches, as Redis decided them ---------------------------------------------------------

    def end(self, user: str) -> None:
        """End ``user``'s match, if any (the peer is told by the caller, not here)."""
        peer = self.matchmaker.peer_of(user)
        if peer is not None:
            self.matchmaker.hangup(user, peer)

    def match(self, impolite: str, polite: str) -> None:
        """Record a match (both leave the pool; any other match of theirs ends)."""
        for user in (impolite, polite):
            self.end(user)
            self.matchmaker.set_unavailable(user)
        self.matchmaker.restore((), [(impolite, polite)])
        self._roles[impolite] = IMPOLITE
        self._roles[polite] = POLITE

    def forget(self, user: str) -> str | None:
        """``user`` disconnected: out of the pool and its match; returns the peer left."""
        self._roles.pop(user, None)
        return self.matchmaker.disconnect(user)

    def rooms_of(self, user: str) -> set[str]:
        return set(self._user_rooms.get(user, ()))

    # -- scale-out ------------------------------------------------------------------------------

    def adopt(self, user: str, in_pool: bool, peer: str | None, role: str) -> None:
        """Take over ``user``'s pool place and match from another instance (its rooms are
        joined by the caller)."""
        if peer:
            if role == POLITE:
                self.match(peer, user)
            else:
                self.match(user, peer)
        elif in_pool:
            self.matchmaker.set_available(user)

    def drop(self, user: str) -> None:
        """``user`` moved to another instance: forget it here. Its match stays recorded if
        the peer is connected here (the match lives on, with the peer on this instance)."""
        for room in list(self._user_rooms.get(user, ())):
            self.leave_now(room, user)
        self.online.pop(user, None)
        self.matchmaker.set_unavailable(user)
        self.matchmaker.forget(user)
        peer = self.matchmaker.peer_of(user)
        if peer is not None and peer not in self.online:
            self.end(user)
            self._roles.pop(user, None)
            self._roles.pop(peer, None)

    def end_all_matches(self) -> list[tuple[str, str]]:
        """End every match a local user is in; (local user, peer) for each local side."""
        matchmaker = self.matchmaker
        pairs = []
        for user in list(self.online):
            peer = matchmaker.peer_of(user)
            if peer is not None:
                pairs.append((user, peer))
                if peer in self.online:
                    pairs.append((peer, user))
        for user, _ in pairs:
            self.end(user)
        return list(dict.fromkeys(pairs))

    # -- matches, decided here (degraded) ------------------------------------------------------

    def request_peer(self, user: str, current_peer: str | None) -> RequestOutcome:
        outcome = self.matchmaker.request_peer(user, current_peer)
        if outcome.peer is not None and not outcome.resend:
            self._roles[user] = IMPOLITE
            self._roles[outcome.peer] = POLITE
        return outcome

    # -- for recovery ------------------------------------------------------------------------------

    def known_users(self) -> set[str]:
        """Every user whose state this instance holds: room members, pooled, matched."""
        matchmaker = self.matchmaker
        for user in [u for u in self._roles if matchmaker.peer_of(u) is None]:
            del self._roles[user]
        return set(self._user_rooms) | set(matchmaker.pool()) | set(self._roles) | set(self.online)

    def user_state(self, user: str) -> UserState:
        """What ``sync_user`` needs to rewrite ``user`` in Redis."""
        matchmaker = self.matchmaker
        peer = matchmaker.peer_of(user)
        return UserState(
            user=user,
            in_pool=matchmaker.in_pool(user),
            peer=peer or "",
            role=self._roles.get(user, IMPOLITE) if peer is not None else "",
            connection=self.online.get(user, ""),
            peer_here=peer is not None and peer in self.online,
            rooms=tuple(sorted(self._user_rooms.get(user, ()))),
        )
