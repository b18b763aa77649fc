"""Blocks, reports and bans kept in this process (the memory store's, and the Redis store's
fallback while Redis fails). Synchronous underneath; the async methods never suspend.

Bounded: blocks by ``MAX_BLOCKS`` per user, reports by ``report_cap`` (oldest dropped), the
recent reporters of a user by the auto-shadow window, bans by the users banned, new DM
partners as ``memory_partners`` says (per user by the limit, in all by ``MAX_ENTRIES``), the
reports filed per user as ``memory_reports`` says (one entry a user, ``MAX_USERS`` in all).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any

import orjson

from aleatoria.safety import (
    AUTO_SHADOW_WINDOW,
    MAX_BLOCKS,
    Admission,
    Ban,
    admission,
    either,
    report_sort_key,
)
from aleatoria.store.memory_partners import DmPartners
from aleatoria.store.memory_reports import ReportCounts

DEFAULT_REPORT_CAP = 10_000


class MemorySafety:
    def __init__(
        self,
        report_cap: int = DEFAULT_REPORT_CAP,
        on_shadow: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_shadow = on_shadow  # a shadow ban began or ended (the matchmaker re-pools)
        # A block was removed: the search queue looks at the two again (set by the store).
        self.on_unblock: Callable[[str, str], None] | None = None
        self._blocks: dict[str, set[str]] = {}
        self._blocked_by: dict[str, set[str]] = {}
        self._reports: deque[dict[str, Any]] = deque(maxlen=max(1, report_cap))
        self._reporters: dict[str, dict[str, float]] = {}  # reported -> reporter -> when
        self._bans: dict[str, Ban] = {}
        self._seq = itertools.count()
        self._last_ms = 0
        # New DM partners per user, on ``clock`` (trio's in a server: tests move it).
        self.dm_partners = DmPartners(clock)
        # Reports filed per user and hour, on the same clock.
        self.report_counts = ReportCounts(clock)

    # -- what matching needs, synchronously (``Matchmaker``'s filter) -------------------------

    def barred(self, user: str) -> AbstractSet[str] | None:
        """Users ``user`` must not be matched with (blocked either way), or None."""
        return either(self._blocks.get(user), self._blocked_by.get(user))

    def shadowed(self, user: str) -> bool:
        ban = self._bans.get(user)
        return ban is not None and ban.shadow and ban.active(time.time())

    # -- the Safety protocol ------------------------------------------------------------------

    async def admit(self, user: str, now: float) -> Admission:
        return self.admit_now(user, now)

    def admit_now(self, user: str, now: float) -> Admission:
        ban = self._bans.get(user)
        if ban is not None and not ban.active(now):
            del self._bans[user]
            ban = None
        return admission(ban, self._blocked_by.get(user, ()))

    async def block(self, blocker: str, blocked: str) -> bool:
        return self.block_now(blocker, blocked)

    def block_now(self, blocker: str, blocked: str) -> bool:
        blocks = self._blocks.setdefault(blocker, set())
        if blocked not in blocks and len(blocks) >= MAX_BLOCKS:
            return False
        blocks.add(blocked)
        self._blocked_by.setdefault(blocked, set()).add(blocker)
        return True

    async def unblock(self, blocker: str, blocked: str) -> None:
        self.unblock_now(blocker, blocked)

    def unblock_now(self, blocker: str, blocked: str) -> None:
        _discard(self._blocks, blocker, blocked)
        _discard(self._blocked_by, blocked, blocker)
        if self.on_unblock is not None:
            self.on_unblock(blocker, blocked)

    async def blocked(self, user: str) -> list[str]:
        return sorted(self._blocks.get(user, ()))

    async def add_report(self, report: dict[str, Any], now: float) -> tuple[str, int]:
        return self.add_report_now(report, now)

    def add_report_now(self, report: dict[str, Any], now: float) -> tuple[str, int]:
        ms = max(int(now * 1000), self._last_ms)
        if ms != self._last_ms:
            self._seq = itertools.count()
            self._last_ms = ms
        report_id = f"{ms}-{next(self._seq)}"
        # Kept as plain JSON data, as Redis gives it back (evidence arrives as fragments).
        self._reports.append({**orjson.loads(orjson.dumps(report)), "id": report_id})
        reported, reporter = str(report["reported"]), str(report["reporter"])
        recent = self._reporters.setdefault(reported, {})
        for old in [who for who, when in recent.items() if now - when >= AUTO_SHADOW_WINDOW]:
            del recent[old]
        recent[reporter] = now
        return report_id, len(recent)

    async def reports(
        self, limit: int, after: str | None = None, user: str | None = None
    ) -> list[dict[str, Any]]:
        bound = None if after is None else report_sort_key(after)
        found: list[dict[str, Any]] = []
        for report in reversed(self._reports):
            if bound is not None and report_sort_key(report["id"]) >= bound:
                continue
            if user is not None and report.get("reported") != user:
                continue
            found.append(report)
            if len(found) >= limit:
                break
        return found

    async def ban(self, ban: Ban) -> None:
        self.ban_now(ban)

    def ban_now(self, ban: Ban) -> None:
        was_shadow = self.shadowed(ban.user)
        self._bans[ban.user] = ban
        if self._on_shadow is not None and was_shadow != self.shadowed(ban.user):
            self._on_shadow(ban.user)

    async def unban(self, user: str) -> bool:
        was_shadow = self.shadowed(user)
        found = self._bans.pop(user, None) is not None
        if self._on_shadow is not None and was_shadow:
            self._on_shadow(user)
        return found

    async def bans(self, now: float) -> list[Ban]:
        for user in [user for user, ban in self._bans.items() if not ban.active(now)]:
            del self._bans[user]
        return sorted(self._bans.values(), key=lambda ban: ban.created, reverse=True)

    async def new_dm_partner(self, user: str, partner: str, limit: int) -> float | None:
        return self.dm_partners.add(user, partner, limit)

    async def count_report(self, user: str, limit: int) -> bool:
        return self.report_counts.add(user, limit)

    def forget_reporters(self, now: float) -> None:
        """Drop reporters older than the window (so idle entries do not pile up)."""
        for reported in list(self._reporters):
            recent = self._reporters[reported]
            for old in [who for who, when in recent.items() if now - when >= AUTO_SHADOW_WINDOW]:
                del recent[old]
            if not recent:
                del self._reporters[reported]


def _discard(table: dict[str, set[str]], key: str, value: str) -> None:
    values = table.get(key)
    if values is not None:
        values.discard(value)
        if not values:
            del table[key]
