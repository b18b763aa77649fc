"""New DM partners per user and hour, kept in this process (PROTOCOL.md section 16: at most
``ALEATORIA_NEW_DM_PER_HOUR`` new DM conversations an hour): the memory store's count, and
the Redis store's fallback while Redis fails. Synchronous; runs on the trio thread.

How this works. Each user has a dict partner -> when it first wrote to that partner (on the
clock given, trio's in a server). ``add`` counts a partner unless the user already has
``limit`` partners within the hour; a partner first written to an hour ago or more no longer
counts, and is dropped when the user's record is full. The count is per user, not per
connection, so a user who reconnects gets no new allowance.

Bounded, also against a client that makes up user ids: a user holds at most ``limit``
entries; users are kept in the order they last gained a partner, so ``sweep`` (every minute,
with the history purge) drops the users with nothing in the last hour from the front without
walking the rest; and past ``max_entries`` in all (about 120 bytes each with 16-character
ids, ~170 with 64), the users who gained a partner least recently are forgotten whole (their
count starts again: forgetting one needs ``max_entries`` newer entries from others).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from aleatoria.safety import NEW_DM_WINDOW as HOUR

# ~25 MB at 16-character ids: 1,000 users at the default limit of 200, or 20,000 users that
# each wrote to 10 new partners within the hour.
MAX_ENTRIES = 200_000


class DmPartners:
    """Per user, the DM partners it wrote to within the hour and when it first did."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_entries: int = MAX_ENTRIES) -> None:
        self._clock = clock
        self.max_entries = max_entries
        # user -> partner -> first; the user who gained a partner least recently first.
        self._users: OrderedDict[str, dict[str, float]] = OrderedDict()
        self.entries = 0  # partners held, every user's together
        self.forgotten = 0  # users forgotten to stay within ``max_entries``

    def __len__(self) -> int:
        return len(self._users)

    def add(self, user: str, partner: str, limit: int) -> float | None:
        """Count ``partner`` among ``user``'s new partners of the hour: how long ago (seconds)
        it first wrote to it within the hour (0.0: counted now), or None when ``user`` has
        ``limit`` other partners within the hour already (nothing is counted then)."""
        now = self._clock()
        partners = self._users.get(user)
        if partners is not None:
            age = self._age(partners, partner, now)
            if age is not None:
                return age
            if len(partners) >= limit and self._prune(partners, now) >= limit:
                return None
        self._insert(user, partners, partner, now)
        return 0.0

    def note(self, user: str, partner: str, age: float, limit: int) -> None:
        """Another store counted ``partner`` for ``user``, first written to ``age`` seconds
        ago (the Redis store keeps this copy for a Redis outage). Never refuses: past
        ``limit``, the user's oldest entries make room."""
        now = self._clock()
        partners = self._users.get(user)
        if partners is not None:
            if self._age(partners, partner, now) is not None:
                return
            if len(partners) >= limit and self._prune(partners, now) >= limit:
                for oldest in sorted(partners, key=partners.__getitem__)[: len(partners) - limit + 1]:
                    del partners[oldest]
                    self.entries -= 1
        self._insert(user, partners, partner, now - age)

    def sweep(self) -> int:
        """Forget the users with no partner within the hour, from the front of the order
        (it stops at the first user with one, so it never walks the active users); returns
        how many were forgotten."""
        now = self._clock()
        users = self._users
        swept = 0
        while users:
            partners = next(iter(users.values()))  # an OrderedDict's first: O(1)
            if any(now - first < HOUR for first in partners.values()):
                break
            users.popitem(last=False)
            self.entries -= len(partners)
            swept += 1
        return swept

    def _age(self, partners: dict[str, float], partner: str, now: float) -> float | None:
        """How long ago ``partner`` was first written to, if within the hour (an older entry
        is dropped: writing to it again counts as new)."""
        first = partners.get(partner)
        if first is None:
            return None
        if now - first < HOUR:
            return max(0.0, now - first)
        del partners[partner]
        self.entries -= 1
        return None

    def _prune(self, partners: dict[str, float], now: float) -> int:
        """Drop ``partners`` an hour old or more; how many are left."""
        for old in [p for p, first in partners.items() if now - first >= HOUR]:
            del partners[old]
            self.entries -= 1
        return len(partners)

    def _insert(self, user: str, partners: dict[str, float] | None, partner: str, first: float) -> None:
        users = self._users
        if partners is None:
            partners = users[user] = {}
        else:
            users.move_to_end(user)
        partners[partner] = first
        self.entries += 1
        while self.entries > self.max_entries and len(users) > 1:
            _, dropped = users.popitem(last=False)  # never ``user``: it is last now
            self.entries -= len(dropped)
            self.forgotten += 1
