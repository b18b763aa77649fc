"""The in-memory store: history with TTL and caps, the room registry, the matchmaker.

The default when no Redis is configured, and the fallback the Redis store serves from while
Redis is failing. Everything here is synchronous and runs on the trio thread; the async
methods exist to satisfy the ``Store`` protocol and never suspend.

History has a total budget in bytes (PROTOCOL.md section 16: memory is bounded by
configuration, not by traffic). Each kept message costs its length plus a fixed estimate of
the objects holding it; past the budget, whole conversations (rooms and DMs alike) are
evicted, the one written to least recently first.
"""

from __future__ import annotations

import bisect
import heapq
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import attrs
from sortedcontainers import SortedList  # type: ignore[import-untyped]  # trio's own dependency

from aleatoria.matchmaking import Matchmaker, RequestOutcome
from aleatoria.search import NO_PROFILE, Profile, Search, SearchEvents, SearchOutcome, SearchRules
from aleatoria.store.base import DIRECTORY_SCAN, Bus, Counts, Health, StoreEvents, Takeover, Whereabouts
from aleatoria.store.memory_safety import DEFAULT_REPORT_CAP, MemorySafety

_History = deque[tuple[int, bytes]]
_K = TypeVar("_K", str, tuple[str, str])

# What one kept message costs beyond its bytes: the bytes object's header (33), the tuple
# (56), its int (32) and the deque's slot (8), rounded up.
ENTRY_OVERHEAD = 136
# What one conversation costs beyond its messages: the deque and its first block, the key,
# two dict slots and the eviction order's entry (measured with tracemalloc: ~950).
CONVERSATION_OVERHEAD = 960
_ROOM = 0
_DM = 1


def _cost(message: bytes) -> int:
    return len(message) + ENTRY_OVERHEAD


def new_instance_id() -> str:
    """A random id for this process (scale-out: presence, channels, logs, /health)."""
    return os.urandom(6).hex()


def microsecond_end(ns: int) -> int:
    """The last nanosecond of ``ns``'s microsecond: createTime has microseconds, so a message
    is "strictly newer" than one whose createTime is ``after`` only past it."""
    return ns // 1000 * 1000 + 999


def dm_key(a: str, b: str) -> tuple[str, str]:
    """The two users of a DM conversation in a fixed order (a < b), as Redis keys them."""
    return (a, b) if a < b else (b, a)


# The members a room's listing keeps beyond a page (``room_members``): leaves it absorbs
# before it walks the room again.
_LISTING_SPARE = 64


class MemoryStore:
    """History, room registry and matchmaking kept in this process."""

    def __init__(
        self,
        *,
        ttl_seconds: float,
        history_max: int,
        clock_ns: Callable[[], int] = time.time_ns,
        matchmaker: Matchmaker | None = None,
        instance: str | None = None,
        budget_bytes: int | None = None,
        report_cap: int = DEFAULT_REPORT_CAP,
        search_rules: SearchRules | None = None,
        search_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._instance = instance or new_instance_id()
        self._ttl_ns = int(ttl_seconds * 1e9)
        self._history_max = history_max
        self._clock_ns = clock_ns
        self._rooms: dict[str, _History] = {}
        self._dms: dict[tuple[str, str], _History] = {}
        # Every conversation, least recently written first (for eviction), and the bytes
        # all of them hold (``_cost`` each).
        self._order: OrderedDict[tuple[int, str | tuple[str, str]], None] = OrderedDict()
        self.history_bytes = 0
        self.budget_bytes = budget_bytes
        self.evicted_conversations = 0
        self._members: dict[str, set[str]] = {}
        # The directory: (-members, room) for every room, kept sorted (``list_rooms``).
        self._by_size: Any = SortedList()
        # The smallest members of a room asked for with more members than a page lists
        # (``room_members``), sorted, kept as members come and go.
        self._listings: dict[str, list[str]] = {}
        self._online: dict[str, str] = {}  # connected user -> its connection id (get_stats)
        self.matchmaker = matchmaker or Matchmaker(clock=search_clock)
        # Its count of new DM partners an hour runs on ``search_clock`` too (trio's in a server).
        self._safety = MemorySafety(report_cap, on_shadow=self.matchmaker.reclassify, clock=search_clock)
        if self.matchmaker.filter is None:
            self.matchmaker.filter = self._safety
        # The search queue (PROTOCOL.md section 12): every pool change goes through it.
        self.search_queue = Search(self.matchmaker, search_rules or SearchRules(), search_clock)
        self._safety.on_unblock = self.search_queue.recheck

    @property
    def round_trips(self) -> bool:
        return False

    async def pool_then_request_peer(
        self, user: str, current_peer: str | None, profile: Profile = NO_PROFILE
    ) -> tuple[str | None, RequestOutcome]:
        # Neither suspends: nothing runs in between (the session never needs to join them here).
        ended = await self.set_available(user)
        return ended, await self.request_peer(user, current_peer, profile)

    @property
    def safety(self) -> MemorySafety:
        return self._safety

    async def whereabouts(self, user: str) -> Whereabouts:
        return self.whereabouts_now(user)

    def whereabouts_now(self, user: str) -> Whereabouts:
        online = user in self._online
        rooms = sorted(room for room, members in self._members.items() if user in members)
        return Whereabouts(online, self._instance if online else None, rooms, self.matchmaker.peer_of(user))

    @property
    def kind(self) -> str:
        return "memory"

    @property
    def instance(self) -> str:
        return self._instance

    @property
    def bus(self) -> Bus | None:
        return None

    def attach(self, events: StoreEvents) -> None:
        pass  # one instance: nothing happens behind the server's back

    def health(self) -> Health:
        return "disabled"

    def gauges(self) -> dict[str, tuple[str, float]]:
        return {
            "aleatoria_pool_size": ("users waiting in the matchmaking pool", self.matchmaker.pool_size()),
            "aleatoria_live_matches": ("matches in progress", self.matchmaker.matches()),
            "aleatoria_search_queue": ("users in the search queue", self.search_queue.queue_length()),
            "aleatoria_history_memory_bytes": ("bytes of history held in memory", self.history_bytes),
        }

    def counters(self) -> dict[str, tuple[str, float]]:
        return {}

    # -- history ----------------------------------------------------------------------------

    def record_room_message(self, room: str, message: bytes, created_ns: int) -> None:
        self._append(_ROOM, self._rooms, room, message, created_ns)

    def record_direct_message(
        self,
        a: str,
        b: str,
        message: bytes,
        created_ns: int,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        self._append(_DM, self._dms, dm_key(a, b), message, created_ns)
        if on_stored is not None:
            on_stored()

    def after_stored(self, fn: Callable[[], None]) -> None:
        fn()  # what is in memory is all there is

    async def recent_room_messages(
        self,
        room: str,
        limit: int,
        before_ns: int | None = None,
        after_ns: int | None = None,
        max_bytes: int | None = None,
    ) -> list[bytes]:
        return self.recent_room_messages_now(room, limit, before_ns, after_ns, max_bytes)

    def recent_room_messages_now(
        self,
        room: str,
        limit: int,
        before_ns: int | None = None,
        after_ns: int | None = None,
        max_bytes: int | None = None,
    ) -> list[bytes]:
        """As ``recent_room_messages``; ``max_bytes`` stops the answer as Redis' read stops
        (references to the stored bytes cost little, but a report parses what it is given)."""
        history = self._rooms.get(room)
        if not history:
            return []
        cutoff = self._clock_ns() - self._ttl_ns
        budget = math.inf if max_bytes is None else max_bytes
        out: list[bytes] = []
        if after_ns is not None:  # forward paging (PROTOCOL.md section 15): oldest first
            low = max(cutoff, microsecond_end(after_ns))
            for created_ns, message in history:
                if len(out) >= limit or budget < 0:
                    break
                if created_ns > low and (before_ns is None or created_ns < before_ns):
                    out.append(message)
                    budget -= len(message) + 1
            return out
        for created_ns, message in reversed(history):
            if created_ns <= cutoff or len(out) >= limit or budget < 0:
                break
            if before_ns is None or created_ns < before_ns:
                out.append(message)
                budget -= len(message) + 1
        return out

    async def direct_messages(self, a: str, b: str, limit: int, max_bytes: int | None = None) -> list[bytes]:
        return self.direct_messages_now(a, b, limit)  # whole: it is in memory already

    def direct_messages_now(self, a: str, b: str, limit: int) -> list[bytes]:
        history = self._dms.get(dm_key(a, b))
        if not history:
            return []
        cutoff = self._clock_ns() - self._ttl_ns
        out: list[bytes] = []
        for created_ns, message in reversed(history):
            if created_ns <= cutoff or len(out) >= limit:
                break
            out.append(message)
        out.reverse()
        return out

    def purge_expired(self) -> int:
        """Drop expired messages everywhere (and empty histories); returns how many. Also
        forgets the DM partner counts of users with no new partner within the hour, the report
        counts of users whose hour is over, and the reporters of users reported longer ago than
        the auto-shadow window."""
        self._safety.dm_partners.sweep()
        self._safety.report_counts.sweep()
        now_ns = self._clock_ns()
        self._safety.forget_reporters(now_ns / 1e9)
        cutoff = now_ns - self._ttl_ns
        return self._purge(_ROOM, self._rooms, cutoff) + self._purge(_DM, self._dms, cutoff)

    def _purge(self, kind: int, table: dict[_K, _History], cutoff: int) -> int:
        dropped = 0
        for key in list(table):
            history = table[key]
            while history and history[0][0] <= cutoff:
                self.history_bytes -= _cost(history.popleft()[1])
                dropped += 1
            if not history:
                del table[key]
                del self._order[(kind, key)]
                self.history_bytes -= CONVERSATION_OVERHEAD
        return dropped

    def _append(self, kind: int, table: dict[_K, _History], key: _K, message: bytes, created_ns: int) -> None:
        history = table.get(key)
        order_key = (kind, key)
        if history is None:
            history = table[key] = deque(maxlen=self._history_max)
            self._order[order_key] = None
            self.history_bytes += CONVERSATION_OVERHEAD
        else:
            self._order.move_to_end(order_key)
        if len(history) == self._history_max:
            self.history_bytes -= len(history[0][1]) + ENTRY_OVERHEAD  # the deque drops it
        history.append((created_ns, message))
        self.history_bytes += len(message) + ENTRY_OVERHEAD
        # Trim on write, so a busy room never keeps expired messages (PROTOCOL.md s6).
        cutoff = created_ns - self._ttl_ns
        while history[0][0] <= cutoff:
            self.history_bytes -= len(history.popleft()[1]) + ENTRY_OVERHEAD
        if self.budget_bytes is not None and self.history_bytes > self.budget_bytes:
            self._evict(self.budget_bytes)

    def _evict(self, budget: int) -> None:
        """Drop whole conversations, least recently written first, until within ``budget``
        (the one just written goes last: it is the most recent)."""
        while self.history_bytes > budget and self._order:
            kind, key = self._order.popitem(last=False)[0]
            table: dict[Any, _History] = self._rooms if kind == _ROOM else self._dms
            history = table.pop(key)
            self.history_bytes -= CONVERSATION_OVERHEAD + sum(_cost(message) for _, message in history)
            self.evicted_conversations += 1

    # -- room registry ----------------------------------------------------------------------

    async def join_room(self, room: str, user: str) -> None:
        members = self._members.setdefault(room, set())
        if user not in members:
            if members:
                self._by_size.remove((-len(members), room))
            members.add(user)
            self._by_size.add((-len(members), room))
            listing = self._listings.get(room)
            if listing and user < listing[-1]:
                bisect.insort(listing, user)
                listing.pop()  # still the smallest len(listing) members

    async def leave_room(self, room: str, user: str) -> None:
        self.leave_room_now(room, user)

    def leave_room_now(self, room: str, user: str) -> None:
        members = self._members.get(room)
        if members is not None and user in members:
            self._by_size.remove((-len(members), room))
            members.discard(user)
            if members:
                self._by_size.add((-len(members), room))
            else:
                del self._members[room]
            listing = self._listings.get(room)
            if listing and user <= listing[-1]:
                listing.pop(bisect.bisect_left(listing, user))  # one fewer, still the smallest
                if not listing:
                    del self._listings[room]

    async def rooms(self) -> list[str]:
        return sorted(self._members)

    # -- directory ------------------------------------------------------------------------------
    # Cost: the rooms are kept sorted by size (a join or leave: O(log rooms)), so
    # ``list_rooms`` reads its first page in O(log rooms + limit), and with a prefix walks at
    # most ``DIRECTORY_SCAN`` rooms, biggest first, as the Redis store does: walking every room
    # (0.2 ms per 1,000) let a client within its rate limit fill the CPU of a server with
    # 30,000 rooms. ``room_members`` of a room with more members than it lists keeps the
    # smallest members (``_LISTING_SPARE`` more than listed) and keeps them up to date: it
    # walked every member each time (4 ms with 20,000 in the Lobby), so a few clients within
    # their rate limit filled the CPU. It walks them again only once members leaving the list
    # have used the spare up.

    async def list_rooms(self, limit: int, prefix: str = "") -> list[tuple[str, int]]:
        return self.list_rooms_now(limit, prefix)

    def list_rooms_now(self, limit: int, prefix: str = "") -> list[tuple[str, int]]:
        if not prefix:
            return [(room, -negative) for negative, room in self._by_size.islice(0, limit)]
        found = []
        for negative, room in self._by_size.islice(0, DIRECTORY_SCAN):
            if room.startswith(prefix):
                found.append((room, -negative))
                if len(found) == limit:
                    break
        return found

    async def room_members(self, room: str, limit: int) -> tuple[int, list[str]]:
        return self.room_members_now(room, limit)

    def room_members_now(self, room: str, limit: int) -> tuple[int, list[str]]:
        members = self._members.get(room, set())
        if len(members) <= limit:
            self._listings.pop(room, None)
            return len(members), sorted(members)
        listing = self._listings.get(room)
        if listing is None or len(listing) < limit:
            listing = self._listings[room] = heapq.nsmallest(limit + _LISTING_SPARE, members)
        return len(members), listing[:limit]

    async def stats(self) -> Counts:
        return self.stats_now()

    def stats_now(self) -> Counts:
        matchmaker = self.matchmaker
        return Counts(
            online=len(self._online),
            searching=matchmaker.pool_size() + self.search_queue.queue_length(),
            in_calls=2 * matchmaker.matches(),
            rooms=len(self._members),
        )

    # -- matchmaking --------------------------------------------------------------------------

    async def set_available(self, user: str, profile: Profile = NO_PROFILE) -> str | None:
        return self.search_queue.set_available(user, profile)

    async def set_unavailable(self, user: str) -> None:
        self.search_queue.set_unavailable(user)

    async def request_peer(
        self, user: str, current_peer: str | None, profile: Profile = NO_PROFILE
    ) -> RequestOutcome:
        return self.search_queue.request_peer(user, current_peer, profile)

    # -- the search queue (PROTOCOL.md section 12) ------------------------------------------------

    async def search(self, user: str, current_peer: str | None, profile: Profile) -> SearchOutcome:
        outcome = self.search_queue.search(user, current_peer, profile)
        return outcome if outcome.resend is not None else attrs.evolve(outcome, online=len(self._online))

    async def cancel_search(self, user: str) -> None:
        self.search_queue.cancel(user)

    async def search_events(self) -> SearchEvents:
        self.search_queue.tick()
        return self.search_queue.events()

    def search_delay(self) -> float | None:
        due = self.search_queue.next_due()
        return None if due is None else max(0.0, due - self.search_queue.clock())

    def on_search_events(
        self, wake: Callable[[], None], announce: Callable[[SearchEvents], None] | None = None
    ) -> None:
        self.search_queue.on_events = wake
        self.search_queue.on_flush = announce

    def match_peer(self, user: str) -> str | None:
        return self.matchmaker.peer_of(user)

    async def match_between(self, user: str, other: str) -> str | None:
        return self.matchmaker.match_between(user, other) or None

    async def hangup(self, user: str, peer: str) -> bool:
        return self.matchmaker.hangup(user, peer)

    async def connect(self, user: str, connection: str) -> Takeover | None:
        self._online[user] = connection
        return None

    async def user_gone(
        self, user: str, connection: str | None = None, rooms: Iterable[str] = ()
    ) -> str | None:
        if connection is None or self._online.get(user) == connection:
            self._online.pop(user, None)
        for room in rooms:
            await self.leave_room(room, user)
        return self.search_queue.disconnect(user)

    def user_moved(self, user: str) -> None:
        pass

    def remote_match(self, user: str, peer: str, role: str) -> None:
        pass

    def remote_match_ended(self, user: str, peer: str) -> None:
        pass
