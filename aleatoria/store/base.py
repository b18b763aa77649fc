"""The store interface: history, room registry and matchmaking, behind one protocol.

Two implementations: ``MemoryStore`` (the default; the whole protocol works on it) and
``RedisStore`` (PROTOCOL.md section 6). The server talks only to this protocol.

Rules every implementation keeps:
- ``record_*`` never block and never raise: live delivery must not wait on storage. A
  Redis store queues the write (write-behind) and flushes it later.
- history entries are the exact JSON bytes that were delivered; timestamps are epoch
  nanoseconds of the server's ``createTime``.
- the matchmaking commands are atomic (see ``aleatoria.matchmaking`` for the rules).
- a failing dependency is handled inside the store (fallback to memory, degraded health);
  the async methods below do not raise because Redis is down.

Scale-out (PROTOCOL.md section 9): every store has an ``instance`` id; the Redis store also
has a ``bus`` (cross-instance delivery), registers connections (``connect``/``user_gone``:
presence) and reports what other instances did to this one's users through the
``StoreEvents`` the server attaches. The memory store is one instance on its own: no bus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from typing import Literal, Protocol

import attrs

from aleatoria.matchmaking import RequestOutcome
from aleatoria.safety import Safety
from aleatoria.search import NO_PROFILE, Profile, SearchEvents, SearchOutcome

# How many rooms ``list_rooms`` with a prefix walks at most, biggest first (both stores): a
# matching room beyond that many is not found, and a request's cost stays bounded.
DIRECTORY_SCAN = 5_000

Health = Literal["ok", "degraded", "disabled"]


@attrs.frozen
class Takeover:
    """What a user who connected here had on another instance (its state carries over)."""

    instance: str
    connection: str
    rooms: tuple[str, ...] = ()
    in_pool: bool = False
    peer: str | None = None
    role: str = ""


@attrs.frozen
class Counts:
    """What ``get_stats`` reports (PROTOCOL.md section 11), across every instance the store
    sees: users connected, users pooled or searching for a call, users in a live match (both
    sides count), rooms with at least one member."""

    online: int
    searching: int
    in_calls: int
    rooms: int


@attrs.frozen
class Whereabouts:
    """Where one user is, for operators (``GET /admin/users/{user}``)."""

    online: bool
    instance: str | None = None
    rooms: list[str] = attrs.Factory(list)
    peer: str | None = None


class BusHandler(Protocol):
    """The trio side that receives what the bus brings (the router; runs on the trio thread)."""

    def on_bus_messages(self, items: list[tuple[str | None, bytes]]) -> None:
        """``items`` in arrival order: (room, message JSON) from room channels, (None, bus
        message) from this instance's channel."""
        ...


class StoreEvents(BusHandler, Protocol):
    """What the store tells the server (implemented by the router): what arrives on the bus,
    and what other instances did to this one's users.

    Handed over with ``Store.attach`` once, after construction, not to the store's
    constructor: the router is built on the store (it delivers through the store's bus), so
    the store -- whose bus thread and heartbeat run from start-up -- exists first. Before
    ``attach`` nobody is connected, so what arrives has nobody to reach."""

    def peer_left(self, peer: str, leaver: str) -> None:
        """``leaver``'s match with ``peer`` ended without a hangup from ``leaver`` (its
        instance died, or this instance was declared dead): tell ``peer``."""
        ...

    def evict(self, instance: str, user: str, connection: str) -> None:
        """``user``'s connection ``connection`` on ``instance`` was replaced by one here."""
        ...

    def kick(self, user: str) -> bool:
        """Close ``user``'s connection with 4003 "banned" (here, or through the bus)."""
        ...

    def safety_at_connect(self, user: str, blocked_by: AbstractSet[str], shadow: bool) -> None:
        """What the store read of ``user`` as its connection here registered: who blocks it,
        and whether it is shadow-banned. Added to what the handshake read (never taken away:
        an unblock's notice is what lifts a block)."""
        ...

    def barred(self, user: str) -> AbstractSet[str] | None:
        """Who blocked ``user``, as its connection here knows (loaded at its handshake, kept
        current by notices), or None: what matching uses while Redis is unreachable."""
        ...

    def shadowed(self, user: str) -> bool:
        """Whether ``user``'s connection here is shadow-banned (as for ``barred``)."""
        ...


class Bus(Protocol):
    """Cross-instance delivery (the Redis bus). ``done`` callbacks get the number of
    subscribers reached, or None when the publish failed; each is called exactly once."""

    instance: str

    @property
    def usable(self) -> bool: ...

    def publish_room(self, room: str, message: bytes) -> bool: ...

    def send_room(self, room: str, message: bytes, done: Callable[[int | None], None]) -> bool: ...

    def publish_instance(self, instance: str, message: bytes) -> bool: ...

    def route(self, user: str, message: bytes, done: Callable[[int | None], None] | None = None) -> bool: ...

    async def route_wait(
        self, user: str, message: bytes, sender: str = "", *, patient: bool = False
    ) -> int | None: ...

    def subscribe_room(self, room: str) -> None: ...

    def unsubscribe_room(self, room: str) -> None: ...

    async def room_ready(self, room: str) -> bool: ...


class Store(Protocol):
    """What the server needs from storage. Cancellation: every async method is a checkpoint
    at most once and leaves the store consistent if cancelled."""

    @property
    def kind(self) -> str:
        """'memory' or 'redis', for logs."""
        ...

    @property
    def instance(self) -> str:
        """This process's random instance id (logged at start-up, in /health)."""
        ...

    @property
    def bus(self) -> Bus | None:
        """Cross-instance delivery, or None (memory store: everyone is local)."""
        ...

    def attach(self, events: StoreEvents) -> None:
        """Where to report what arrives on the bus and what other instances did to this
        one's users (once, before the first connection; see ``StoreEvents``)."""
        ...

    def health(self) -> Health:
        """'disabled' (memory store), 'ok' or 'degraded' (Redis configured but failing)."""
        ...

    @property
    def round_trips(self) -> bool:
        """Whether its calls wait on another process (Redis): then a session joins a
        ``user_available_webrtc`` with the ``request_random_peer`` right after it."""
        ...

    @property
    def safety(self) -> Safety:
        """Blocks, reports and bans (PROTOCOL.md section 13), shared like the rest."""
        ...

    async def whereabouts(self, user: str) -> Whereabouts:
        """Whether ``user`` is online, where, its rooms and its live match (for operators)."""
        ...

    def gauges(self) -> dict[str, tuple[str, float]]:
        """Gauges for ``/metrics``: name -> (help, value). Cheap and synchronous."""
        ...

    def counters(self) -> dict[str, tuple[str, float]]:
        """Counters for ``/metrics`` (running totals; exported with ``_total``): name without
        the suffix -> (help, value). Cheap and synchronous."""
        ...

    # -- history --------------------------------------------------------------------------

    def record_room_message(self, room: str, message: bytes, created_ns: int) -> None:
        """Keep ``message`` in the room's history (trimmed to TTL and cap)."""
        ...

    def record_direct_message(
        self,
        a: str,
        b: str,
        message: bytes,
        created_ns: int,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        """Keep ``message`` in the history between ``a`` and ``b`` (order of a, b irrelevant).
        ``on_stored`` is called exactly once, on the trio thread, when the message is durable
        (Redis answered its write; at once for the memory store, and while Redis is degraded):
        the sender's own copy waits for it (PROTOCOL.md section 16)."""
        ...

    def after_stored(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` exactly once, on the trio thread, when every message recorded so far is
        durable, as ``on_stored`` (at once for the memory store and while Redis is degraded).
        For a room message delivered to the other members before Redis had it (the bus gave
        up on publishing it): its sender's own copy waits for this (PROTOCOL.md section 16)."""
        ...

    async def recent_room_messages(
        self,
        room: str,
        limit: int,
        before_ns: int | None = None,
        after_ns: int | None = None,
        max_bytes: int | None = None,
    ) -> list[bytes]:
        """Up to ``limit`` messages of ``room`` newer than the TTL, newest first, strictly
        older than ``before_ns`` when given. With ``after_ns``: the ``limit`` oldest strictly
        newer than it (and older than ``before_ns``), oldest first (forward paging). With
        ``max_bytes``, the answer may end after the first message that takes the ones before it
        over ``max_bytes`` bytes, each counted as its length plus one: the caller keeps no more
        (a history reply's cut, ``core._within``), Redis reads no more and the memory store
        answers no more (a report's evidence parses what it is given)."""
        ...

    async def direct_messages(self, a: str, b: str, limit: int, max_bytes: int | None = None) -> list[bytes]:
        """The last ``limit`` messages between ``a`` and ``b`` within the TTL, oldest first;
        with ``max_bytes``, the answer may start at the oldest one counted as
        ``recent_room_messages`` counts them from the newest."""
        ...

    # -- room registry ----------------------------------------------------------------------

    async def join_room(self, room: str, user: str) -> None: ...

    async def leave_room(self, room: str, user: str) -> None: ...

    async def rooms(self) -> list[str]:
        """Names of rooms that have members (on any instance), sorted."""
        ...

    # -- directory (PROTOCOL.md section 11; reads, served from memory while degraded) ---------

    async def list_rooms(self, limit: int, prefix: str = "") -> list[tuple[str, int]]:
        """Up to ``limit`` rooms that have members (on any instance) and whose names start
        with ``prefix``, as (room, member count): most members first, then by name."""
        ...

    async def room_members(self, room: str, limit: int) -> tuple[int, list[str]]:
        """How many members ``room`` has (exact), and up to ``limit`` of them, sorted."""
        ...

    async def stats(self) -> Counts:
        """The ``get_stats`` figures."""
        ...

    # -- matchmaking -------------------------------------------------------------------------

    async def set_available(self, user: str, profile: Profile = NO_PROFILE) -> str | None:
        """Pool ``user`` with ``profile``, ending its live match and leaving the search queue;
        returns the peer who was left, if any. The oldest compatible searcher may take it
        (announced through ``search_events``)."""
        ...

    async def set_unavailable(self, user: str) -> None:
        """Leave the pool and the search queue."""
        ...

    async def request_peer(
        self, user: str, current_peer: str | None, profile: Profile = NO_PROFILE
    ) -> RequestOutcome:
        """The immediate pick (``matchmaking``; with a profile, ``search``'s preferences)."""
        ...

    # -- the search queue (PROTOCOL.md section 12; rules in ``aleatoria.search``) ----------------

    async def search(self, user: str, current_peer: str | None, profile: Profile) -> SearchOutcome:
        """``user`` joins the search queue (or, in a match it did not name, hears it again).
        A match made at once is announced through ``search_events``, like every other."""
        ...

    async def cancel_search(self, user: str) -> None: ...

    async def search_events(self) -> SearchEvents:
        """Time out or re-match the searchers that are due, and hand over every match and
        timeout since the last call (each exactly once, to one instance)."""
        ...

    def search_delay(self) -> float | None:
        """Seconds until ``search_events`` has work for sure (None: only when woken)."""
        ...

    def on_search_events(
        self, wake: Callable[[], None], announce: Callable[[SearchEvents], None] | None = None
    ) -> None:
        """Call ``wake`` (on the trio thread) whenever there are events to hand over; a store
        that may end a match before its announcement has run hands its events to ``announce``
        at once instead (the memory store)."""
        ...

    async def pool_then_request_peer(
        self, user: str, current_peer: str | None, profile: Profile = NO_PROFILE
    ) -> tuple[str | None, RequestOutcome]:
        """``set_available`` (no profile) then ``request_peer`` (with ``profile``), with
        nothing in between (atomic)."""
        ...

    def match_peer(self, user: str) -> str | None:
        """``user``'s peer in a live match, as far as this instance knows (its own users'
        matches; None for a user on another instance). Synchronous and cheap."""
        ...

    async def hangup(self, user: str, peer: str) -> bool:
        """End the match of ``user`` and ``peer`` if it is live; True if it was."""
        ...

    async def match_between(self, user: str, other: str) -> str | None:
        """For a report (PROTOCOL.md section 13): the id of ``user``'s live match if ``other``
        is its peer, else of the most recent match between them among ``user``'s last
        ``matchmaking.RECENT_MATCHES`` that ended within ``RECENT_MATCH_SECONDS``; None if
        none. The memory store forgets a user's record when it disconnects for good; Redis
        keeps it until it expires (``RECENT_MATCH_SECONDS`` after its last entry)."""
        ...

    async def connect(self, user: str, connection: str) -> Takeover | None:
        """Register ``user``'s new connection here; what it had on another instance, if it
        was connected there (that instance must then drop it: see ``StoreEvents.evict``)."""
        ...

    async def user_gone(
        self, user: str, connection: str | None = None, rooms: Iterable[str] = ()
    ) -> str | None:
        """``user``'s connection closed for good: leave ``rooms``, pool and match; returns the
        peer left. A connection that is no longer the user's registered one (it moved to
        another instance) leaves the shared state alone."""
        ...

    def user_moved(self, user: str) -> None:
        """``user`` now belongs to another instance: forget it here, changing nothing shared."""
        ...

    def remote_match(self, user: str, peer: str, role: str) -> None:
        """Another instance matched local ``user`` with ``peer`` (its ``assign_role`` came)."""
        ...

    def remote_match_ended(self, user: str, peer: str) -> None:
        """``peer``, on another instance, ended its match with local ``user`` (a hangup came)."""
        ...
