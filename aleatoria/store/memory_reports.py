"""Reports filed per user and hour, kept in this process (PROTOCOL.md section 13: a user files
at most ``ALEATORIA_REPORTS_PER_HOUR`` reports an hour): the memory store's count, and the
Redis store's fallback while Redis fails. Synchronous; runs on the trio thread.

How this works. A fixed window per user: a user's first report opens an hour (on the clock
given, trio's in a server), the reports within it are counted, and once ``limit`` are, the
next is refused until that hour is over; the report after it opens a new hour. So a refused
user has filed ``limit`` reports within the last hour, and in any 60 minutes a user files at
most twice ``limit`` (the end of one window and the start of the next). The count is per
user, not per connection, so a user who reconnects gets no new allowance. A refused report
is not counted (it changes nothing: the window ends when it ends).

Bounded, also against a client that makes up user ids: one entry per user (about 240 bytes
with 16-character ids), kept in the order their windows opened, so ``sweep`` (every minute,
with the history purge) drops the users whose hour is over from the front without walking
the rest; and past ``max_users``, the users whose window opened first are forgotten (their
count starts again: forgetting one needs ``max_users`` newer windows from others).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from aleatoria.safety import REPORT_WINDOW as HOUR

# ~24 MB at 16-character ids: 100,000 users who each filed a report within the hour.
MAX_USERS = 100_000


class ReportCounts:
    """Per user, when its window of an hour opened and how many reports it counted."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_users: int = MAX_USERS) -> None:
        self._clock = clock
        self.max_users = max_users
        # user -> (when its window opened, reports counted in it); the oldest window first.
        self._users: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self.forgotten = 0  # users forgotten to stay within ``max_users``

    def __len__(self) -> int:
        return len(self._users)

    def add(self, user: str, limit: int) -> bool:
        """Count a report of ``user``: True, or False when it has ``limit`` counted in its
        window already (nothing is counted then)."""
        now = self._clock()
        window = self._users.get(user)
        if window is not None and now - window[0] < HOUR:
            opened, count = window
            if count >= limit:
                return False
            self._users[user] = (opened, count + 1)  # keeps its place: the order is the opening's
            return True
        self._open(user, now, 1)
        return True

    def note(self, user: str, count: int, left: float) -> None:
        """Another store counted ``count`` reports of ``user`` in a window that ends in
        ``left`` seconds (the Redis store keeps this copy for a Redis outage)."""
        now = self._clock()
        opened = now - max(0.0, HOUR - left)
        window = self._users.get(user)
        if window is None or now - window[0] >= HOUR or count == 1:  # a new window
            self._open(user, opened, count)
        else:
            self._users[user] = (opened, count)

    def sweep(self) -> int:
        """Forget the users whose hour is over, from the front of the order (it stops at the
        first whose hour is not: it never walks the rest); returns how many were forgotten."""
        now = self._clock()
        users = self._users
        swept = 0
        while users:
            opened, _ = next(iter(users.values()))  # an OrderedDict's first: O(1)
            if now - opened < HOUR:
                break
            users.popitem(last=False)
            swept += 1
        return swept

    def _open(self, user: str, opened: float, count: int) -> None:
        users = self._users
        users[user] = (opened, count)
        users.move_to_end(user)
        while len(users) > self.max_users:
            users.popitem(last=False)  # never ``user``: it is last now
            self.forgotten += 1
