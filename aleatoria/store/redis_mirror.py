"""The Redis store's local mirror: this instance's live state, always current.

A ``MemoryStore`` plus what recovery needs to rewrite Redis from it: which rooms each local
user is in (the reverse of the room registry) and the role of each side of a match (the
``Matchmaker`` keeps roles private). While Redis is healthy the mirror copies every outcome
Redis decided; while it is degraded the mirror decides, as the memory store would.
"""

from __future__ import annotations

from aleatoria.matchmaking import IMPOLITE, POLITE, RequestOutcome
from aleatoria.store.memory import MemoryStore


class Mirror:
    """This instance's rooms, pool places, matches and recent history."""

    def __init__(self, *, ttl_seconds: float, history_max: int) -> None:
        self.memory = MemoryStore(ttl_seconds=ttl_seconds, history_max=history_max)
        self.matchmaker = self.memory.matchmaker
        self._user_rooms: dict[str, set[str]] = {}
        self._roles: dict[str, str] = {}

    # -- rooms ----------------------------------------------------------------------------

    async def join(self, room: str, user: str) -> None:
        await self.memory.join_room(room, user)
        self._user_rooms.setdefault(user, set()).add(room)

    async def leave(self, room: str, user: str) -> None:
        await self.memory.leave_room(room, user)
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
        return set(self._user_rooms) | set(matchmaker.pool()) | set(self._roles)

    def user_state(self, user: str) -> list[str]:
        """The arguments of the ``sync_user`` script: user, in pool (0/1), peer, role, rooms."""
        matchmaker = self.matchmaker
        peer = matchmaker.peer_of(user)
        role = self._roles.get(user, IMPOLITE) if peer is not None else ""
        in_pool = "1" if matchmaker.in_pool(user) else "0"
        return [user, in_pool, peer or "", role, *sorted(self._user_rooms.get(user, ()))]
