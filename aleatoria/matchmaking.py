"""Matchmaking rules: the pool of available users and the live matches (pure, no I/O).

How this works. A user is in at most one live match. ``request_peer`` implements every rule
of PROTOCOL.md section 4 in one step, so a store can run it atomically (the memory store calls
this class under no lock because trio is single-threaded between awaits; the Redis store runs
the same rules as one Lua script):

1. the requester is in a match with P: if ``current_peer == P`` ("next") the match ends and P
   is told (``ended_peer``); otherwise nothing new happens and the requester's own
   ``assign_role`` is sent again (``resend``);
2. one pooled user who is not the requester, not ``current_peer``, not in a match, not blocked
   by or blocking the requester, and shadow-banned exactly when the requester is (PROTOCOL.md
   section 13; the ``MatchFilter``) is picked uniformly at random; both leave the pool and the
   match starts (requester impolite);
3. nobody suitable: ``no_peer``.

A report (PROTOCOL.md section 13) records the match between reporter and reported user:
``match_between`` gives the live match's id, else the most recent of the user's last
``RECENT_MATCHES`` ended matches with that user that ended within ``RECENT_MATCH_SECONDS``
(the Redis store keeps the same record in Lua). A user's record goes when it disconnects.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from typing import Protocol

import attrs

IMPOLITE = "impolite"
POLITE = "polite"

# What each user's record of its ended matches keeps (for reports, ``match_between``): the
# last this many, those that ended within this many seconds.
RECENT_MATCHES = 8
RECENT_MATCH_SECONDS = 3600.0

# A match id names a match in reports and logs, nothing more (no one proves anything with
# it), so it needs to be unique, not secret: this process's random prefix and a counter. A
# random id per match was a getrandom() system call: 1.7 % of the server's CPU in match 200.
_ID_PREFIX = os.urandom(6).hex()
_ids = itertools.count(1)


def new_match_id() -> str:
    """A match id no other match of any instance has."""
    return f"{_ID_PREFIX}{next(_ids):x}"


@attrs.define  # treated as immutable; not frozen: one is made per request (setattr per field)
class RequestOutcome:
    """What ``request_peer`` decided. Exactly one of ``peer``/``resend``/``no_peer`` holds.

    ``peer`` and ``role``: the requester's match partner and the requester's role (a new match,
    or with ``resend`` the existing one). ``ended_peer``: a previous partner whose match this
    request ended and who must be sent ``hangup {reason: peer_left}``.
    """

    peer: str | None = None
    role: str = IMPOLITE
    resend: bool = False
    ended_peer: str | None = None
    # PROTOCOL.md section 12: the match's id (kept with it, so a resend carries the same) and
    # the interests the two share.
    match_id: str = ""
    common: tuple[str, ...] = ()

    @property
    def no_peer(self) -> bool:
        return self.peer is None


class MatchFilter(Protocol):
    """Who may be matched with whom, besides the pool's own rules (blocks, shadow bans)."""

    def barred(self, user: str) -> AbstractSet[str] | None:
        """Users ``user`` must never be matched with, or None."""
        ...

    def shadowed(self, user: str) -> bool:
        """Whether ``user`` is shadow-banned (matched only with other shadow-banned users)."""
        ...


class Matchmaker:
    """The pool and the live matches of one server (or of one Redis, mirrored by Lua)."""

    def __init__(
        self,
        rng: random.Random | None = None,
        match_filter: MatchFilter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rng = rng or random.Random()
        self.filter = match_filter
        self.clock = clock  # when a match ended (``match_between``)
        # Pooled users who were shadow-banned when pooled (``reclassify`` on a ban).
        self._shadow_pooled: set[str] = set()
        # A list plus an index gives O(1) uniform picks and O(1) removal.
        self._pool: list[str] = []
        self._pool_index: dict[str, int] = {}
        self._peer_of: dict[str, str] = {}
        self._role_of: dict[str, str] = {}
        self._match_id: dict[str, str] = {}
        # The interests the two of a live match share (only matches that share some).
        self._common: dict[str, tuple[str, ...]] = {}
        # Each user's last RECENT_MATCHES ended matches: (peer, match id, when), oldest first.
        self._ended: dict[str, deque[tuple[str, str, float]]] = {}
        # Called before a live match ends (``search.Search``: announce its matches first).
        self.before_end: Callable[[], None] | None = None

    # -- queries ---------------------------------------------------------------------------

    def pool(self) -> list[str]:
        return list(self._pool)

    def pool_size(self) -> int:
        return len(self._pool)

    def in_pool(self, user: str) -> bool:
        return user in self._pool_index

    def peer_of(self, user: str) -> str | None:
        return self._peer_of.get(user)

    def matches(self) -> int:
        return len(self._peer_of) // 2

    def role_of(self, user: str) -> str:
        return self._role_of.get(user, IMPOLITE)

    def match_id(self, user: str) -> str:
        """The id of ``user``'s live match ('' if none, or made before ids were kept)."""
        return self._match_id.get(user, "")

    def match_between(self, user: str, other: str) -> str:
        """The id of ``user``'s live match if ``other`` is its peer, else of its most recent
        match with ``other`` among its last ``RECENT_MATCHES`` ended within
        ``RECENT_MATCH_SECONDS`` ('' if none)."""
        if self._peer_of.get(user) == other:
            live = self._match_id.get(user)
            if live:
                return live
        ended = self._ended.get(user)
        if ended:
            now = self.clock()
            for peer, match_id, when in reversed(ended):
                if peer == other and now - when < RECENT_MATCH_SECONDS:
                    return match_id
        return ""

    def forget(self, user: str) -> None:
        """Drop ``user``'s record of its ended matches (it went away)."""
        self._ended.pop(user, None)

    def common(self, user: str) -> tuple[str, ...]:
        """The interests ``user`` and its live peer share (a resend carries them)."""
        return self._common.get(user, ())

    def pool_view(self) -> list[str]:
        """The pool itself (not a copy): read it, do not change it."""
        return self._pool

    # -- commands --------------------------------------------------------------------------

    def set_available(self, user: str) -> str | None:
        """Put ``user`` in the pool; end its live match. Returns the peer who was left."""
        ended = self._end_match(user)
        self._pool_add(user)
        return ended

    def set_unavailable(self, user: str) -> None:
        self._pool_remove(user)

    def hangup(self, user: str, peer: str) -> bool:
        """``user`` hung up on ``peer``: end their match if that is the live one."""
        if self._peer_of.get(user) != peer:
            return False
        self._end_match(user)
        return True

    def disconnect(self, user: str) -> str | None:
        """``user`` went away: leave the pool, end the match. Returns the peer who was left
        (whose record of ended matches keeps this one; ``user``'s own record goes)."""
        self._pool_remove(user)
        ended = self._end_match(user)
        self._ended.pop(user, None)
        return ended

    def request_peer(
        self,
        user: str,
        current_peer: str | None = None,
        choose: Callable[[set[str]], str | None] | None = None,
    ) -> RequestOutcome:
        """``choose``: picks among the pool given the users to exclude, instead of the
        uniform pick (``search.Search`` prefers common interests; it applies the filter)."""
        ended: str | None = None
        partner = self._peer_of.get(user)
        if partner is not None:
            if partner != current_peer:
                return self.resend(user, partner)
            ended = self._end_match(user)
        excluded = {user} if current_peer is None else {user, current_peer}
        if choose is not None:
            peer = choose(excluded)
        elif self.filter is None:
            peer = self._pick(excluded)
        else:
            peer = self._pick_filtered(user, excluded, self.filter)
        if peer is None:
            return RequestOutcome(ended_peer=ended)
        match_id = self.pair(user, peer)
        return RequestOutcome(peer=peer, role=IMPOLITE, ended_peer=ended, match_id=match_id)

    def resend(self, user: str, partner: str) -> RequestOutcome:
        """``user``'s live match with ``partner`` told again (PROTOCOL.md section 4): the same
        role, id and common interests."""
        return RequestOutcome(
            peer=partner,
            role=self._role_of.get(user, IMPOLITE),
            resend=True,
            match_id=self.match_id(user),
            common=self.common(user),
        )

    def share(self, user: str, peer: str, common: tuple[str, ...]) -> None:
        """Keep the interests the live match of ``user`` and ``peer`` was made on."""
        if common and self._peer_of.get(user) == peer:
            self._common[user] = self._common[peer] = common

    def pair(self, impolite: str, polite: str, match_id: str | None = None) -> str:
        """Start the match of two users who are in none (both leave the pool); its id."""
        self._pool_remove(impolite)
        self._pool_remove(polite)
        self._peer_of[impolite] = polite
        self._peer_of[polite] = impolite
        self._role_of[impolite] = IMPOLITE
        self._role_of[polite] = POLITE
        match_id = match_id or new_match_id()
        self._match_id[impolite] = self._match_id[polite] = match_id
        return match_id

    def restore(self, pool: Iterable[str], matches: Iterable[tuple[str, str]]) -> None:
        """Re-add state (used when a store falls back to memory and back)."""
        for user in pool:
            self._pool_add(user)
        for impolite, polite in matches:
            self._peer_of[impolite] = polite
            self._peer_of[polite] = impolite
            self._role_of[impolite] = IMPOLITE
            self._role_of[polite] = POLITE

    # -- internals -------------------------------------------------------------------------

    def _pick(self, excluded: set[str]) -> str | None:
        # Pooled users are never in a match (a match removes both from the pool, and
        # set_available ends the match first), so only ``excluded`` needs skipping. Map a
        # uniform draw over the allowed slots onto pool positions: uniform and O(1).
        skip = sorted(self._pool_index[u] for u in excluded if u in self._pool_index)
        allowed = len(self._pool) - len(skip)
        if allowed <= 0:
            return None
        position = self._rng.randrange(allowed)
        for index in skip:
            if index <= position:
                position += 1
        return self._pool[position]

    def _pick_filtered(self, user: str, excluded: set[str], match_filter: MatchFilter) -> str | None:
        barred = match_filter.barred(user)
        if barred:
            excluded |= barred
        shadowed = match_filter.shadowed(user)
        while True:
            if shadowed:
                # Shadow-banned users are few: pick among them directly.
                allowed = sorted(u for u in self._shadow_pooled if u not in excluded)
                peer = self._rng.choice(allowed) if allowed else None
            else:
                peer = self._pick(excluded | self._shadow_pooled)
            # Asked from the picked side too: a filter may know a user's blocks only as
            # ``barred`` of the blocked one (the Redis store's while degraded), and a pooled
            # user's shadow side is the one it had when pooled.
            if peer is None or not _refuses(match_filter, peer, user, shadowed):
                return peer
            excluded.add(peer)

    def reclassify(self, user: str) -> None:
        """``user``'s shadow ban began or ended: a pooled user changes sides."""
        if user in self._pool_index:
            self._pool_remove(user)
            self._pool_add(user)

    def _pool_add(self, user: str) -> None:
        if user not in self._pool_index:
            self._pool_index[user] = len(self._pool)
            self._pool.append(user)
            if self.filter is not None and self.filter.shadowed(user):
                self._shadow_pooled.add(user)

    def _pool_remove(self, user: str) -> None:
        index = self._pool_index.pop(user, None)
        if index is None:
            return
        self._shadow_pooled.discard(user)
        last = self._pool.pop()
        if index < len(self._pool):
            self._pool[index] = last
            self._pool_index[last] = index

    def _end_match(self, user: str) -> str | None:
        if user not in self._peer_of:
            return None
        if self.before_end is not None:
            self.before_end()
        peer = self._peer_of.pop(user)
        self._peer_of.pop(peer, None)
        self._role_of.pop(user, None)
        self._role_of.pop(peer, None)
        match_id = self._match_id.pop(user, None)
        self._match_id.pop(peer, None)
        if self._common:
            self._common.pop(user, None)
            self._common.pop(peer, None)
        if match_id:  # a match restored without an id leaves nothing to report
            now = self.clock()
            self._remember_ended(user, peer, match_id, now)
            self._remember_ended(peer, user, match_id, now)
        return peer

    def _remember_ended(self, user: str, peer: str, match_id: str, now: float) -> None:
        ended = self._ended.get(user)
        if ended is None:
            ended = self._ended[user] = deque(maxlen=RECENT_MATCHES)
        ended.append((peer, match_id, now))


def _refuses(match_filter: MatchFilter, peer: str, user: str, shadowed: bool) -> bool:
    """Whether ``peer`` may not be matched with ``user`` (whose shadow ban is ``shadowed``)."""
    barred = match_filter.barred(peer)
    return bool(barred and user in barred) or match_filter.shadowed(peer) != shadowed
