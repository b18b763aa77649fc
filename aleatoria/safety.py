"""Safety data (PROTOCOL.md section 13): blocks, reports and bans — the values and the store
interface, pure; and, from section 16, each user's count of new DM partners an hour. The
rules that use them are the core's (``aleatoria.core``); the operator API is
``aleatoria.admin``; the two stores are ``store.memory_safety`` and ``store.redis_safety``.

What each holds:
- a block is one user's decision about another: kept as ``blocks[blocker]`` (what
  ``get_blocked`` lists, at most ``MAX_BLOCKS``) and ``blocked_by[blocked]`` (what a
  connection loads at its handshake: the users it may not write to, checked without a
  store call on every DM and signal);
- a report is a JSON object (reporter, reported, reason, details, time, match, instance,
  evidence) with an id that sorts by time; the store keeps the newest ``report_cap``;
- a ban is a user, an end (None: permanent), a reason and whether it is a shadow ban;
- the new DM partners of a user are partner -> when it first wrote to them within the hour
  (``NEW_DM_WINDOW``), per user rather than per connection, so a reconnect does not reset the
  count (the connection keeps a cache of them: only a partner it does not know costs a call);
- the reports a user filed are counted per user in a window of an hour from its first
  (``REPORT_WINDOW``; at most ``ALEATORIA_REPORTS_PER_HOUR``), in the store, so that neither a
  reconnect nor another instance starts the count again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from typing import Any, Protocol, TypeVar

import attrs

REPORT_REASONS = ("spam", "harassment", "nudity", "underage", "hate", "other")
MAX_BLOCKS = 1000
MAX_DETAILS_CHARS = 500
EVIDENCE_MESSAGES = 20
# ...and at most this many bytes of each kind (the newest that fit, at least one): a report is
# kept until ALEATORIA_REPORT_CAP newer ones push it out, so its size bounds the store's.
EVIDENCE_BYTES = 32 * 1024
# A reported user's room messages are looked for in at most this many of the reporter's rooms,
# among the last this many messages of each (and, in all, what one history reply may hold:
# ``core._report``).
EVIDENCE_ROOMS = 20
EVIDENCE_ROOM_MESSAGES = 100
AUTO_SHADOW_WINDOW = 3600.0
# New DM partners are counted per user over this window (PROTOCOL.md section 16), in the store.
NEW_DM_WINDOW = 3600.0
# The reports a user files are counted per user over a window this long from its first
# (PROTOCOL.md section 13, ``ALEATORIA_REPORTS_PER_HOUR``), in the store.
REPORT_WINDOW = 3600.0
AUTO_SHADOW_SECONDS = 86400.0
# A permanent ban's end where a number is needed (Redis scores): year 33658.
FOREVER = 1e12


@attrs.frozen
class Ban:
    """A ban on ``user`` from ``created`` until ``until`` (unix seconds; None: permanent)."""

    user: str
    until: float | None
    reason: str = ""
    shadow: bool = False
    created: float = 0.0

    def active(self, now: float) -> bool:
        return self.until is None or self.until > now

    def to_json(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "until": self.until,
            "reason": self.reason,
            "shadow": self.shadow,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ban:
        until = data.get("until")
        return cls(
            user=str(data["user"]),
            until=None if until is None else float(until),
            reason=str(data.get("reason") or ""),
            shadow=bool(data.get("shadow")),
            created=float(data.get("created") or 0.0),
        )


@attrs.frozen
class Admission:
    """What a connecting user brings from the store: its ban (None if none is active) and
    the users who blocked it."""

    ban: Ban | None = None
    blocked_by: frozenset[str] = frozenset()

    @property
    def refused(self) -> bool:
        """A ban that keeps the user out (a shadow ban lets it in)."""
        return self.ban is not None and not self.ban.shadow

    @property
    def shadow(self) -> bool:
        return self.ban is not None and self.ban.shadow


# Most users are neither banned nor blocked: they share one admission (a connection keeps its
# admission as long as it lives; a fresh one cost ~270 bytes a connection).
ADMITTED = Admission()


def admission(ban: Ban | None, blocked_by: Iterable[str]) -> Admission:
    """The admission of a user with ``ban`` (None if none is active), blocked by ``blocked_by``."""
    who = frozenset(blocked_by)
    return ADMITTED if ban is None and not who else Admission(ban, who)


def either(first: AbstractSet[str] | None, second: AbstractSet[str] | None) -> AbstractSet[str] | None:
    """The users in either set, or None when both are empty: a matching filter's ``barred``
    of two sources (most users are in neither, and get no new set)."""
    if first and second:
        return Either(first, second)
    return first or second or None


_T = TypeVar("_T")


class Either(AbstractSet[str]):
    """Two sets seen as their union, without building it. Matching asks ``in`` of a user's
    ``barred`` once per candidate it looks at, and the union cost a copy of both sets each
    time: with 1,000 blocks each way (one address's searchers that all blocked each other) a
    search at 1,000 of them took 19.5 ms. Its own operators (``|``) give a plain set."""

    __slots__ = ("_first", "_second")

    def __init__(self, first: AbstractSet[str], second: AbstractSet[str]) -> None:
        self._first = first
        self._second = second

    def __contains__(self, user: object) -> bool:
        return user in self._first or user in self._second

    def __iter__(self) -> Iterator[str]:
        yield from self._first
        yield from (user for user in self._second if user not in self._first)

    def __len__(self) -> int:
        return len(self._first) + sum(1 for user in self._second if user not in self._first)

    def __bool__(self) -> bool:  # without counting: ``if barred`` comes before each ``in``
        return bool(self._first) or bool(self._second)

    @classmethod
    def _from_iterable(cls, items: Iterable[_T]) -> AbstractSet[_T]:
        return set(items)


class Safety(Protocol):
    """Blocks, reports and bans, shared by every instance (Redis) or this process (memory).
    Like the ``Store``, no method raises because Redis is down: each falls back to memory."""

    async def admit(self, user: str, now: float) -> Admission:
        """``user``'s active ban and the users who blocked it (at its handshake)."""
        ...

    async def block(self, blocker: str, blocked: str) -> bool:
        """Record the block; False if ``blocker`` has ``MAX_BLOCKS`` already (idempotent: a
        block that exists is True)."""
        ...

    async def unblock(self, blocker: str, blocked: str) -> None: ...

    async def blocked(self, user: str) -> list[str]:
        """The users ``user`` blocked, sorted."""
        ...

    async def add_report(self, report: dict[str, Any], now: float) -> tuple[str, int]:
        """Keep ``report`` (its ``reporter`` and ``reported`` fields are read); returns its
        id and how many distinct users reported ``reported`` within ``AUTO_SHADOW_WINDOW``."""
        ...

    async def reports(
        self, limit: int, after: str | None = None, user: str | None = None
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` reports, newest first, older than report ``after`` when given,
        about ``user`` when given; each with its ``id``."""
        ...

    async def ban(self, ban: Ban) -> None:
        """Keep ``ban`` (replacing any ban of the same user)."""
        ...

    async def unban(self, user: str) -> bool:
        """End ``user``'s ban; whether there was one."""
        ...

    async def bans(self, now: float) -> list[Ban]:
        """The active bans, newest first."""
        ...

    async def new_dm_partner(self, user: str, partner: str, limit: int) -> float | None:
        """Count ``partner`` among ``user``'s new DM partners of the hour, atomically (two
        connections or instances of one user cannot both pass the limit): how long ago, in
        seconds, ``user`` first wrote to ``partner`` within the hour (0.0: counted now), or
        None when it has ``limit`` other partners within the hour (nothing is counted)."""
        ...

    async def count_report(self, user: str, limit: int) -> bool:
        """Count a report filed by ``user`` in its window of an hour, atomically (two
        connections or instances of one user cannot both pass the limit): True, or False when
        ``limit`` are counted in the window already (nothing is counted)."""
        ...


def report_problem(reason: object, details: object) -> str | None:
    """Why a report's reason or details are refused, or None (PROTOCOL.md section 13)."""
    if reason not in REPORT_REASONS:
        return f"reason must be one of {', '.join(REPORT_REASONS)}"
    if details is not None and (not isinstance(details, str) or len(details) > MAX_DETAILS_CHARS):
        return f"details must be text of at most {MAX_DETAILS_CHARS} characters"
    return None


def newest_first(reports: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(reports, key=lambda report: report_sort_key(str(report["id"])), reverse=True)


def report_sort_key(report_id: str) -> tuple[int, int]:
    """Report ids are ``<ms>-<seq>`` (Redis stream ids): order by both numbers."""
    ms, _, seq = report_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0
