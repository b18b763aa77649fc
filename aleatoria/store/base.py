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
"""

from __future__ import annotations

from typing import Literal, Protocol

from aleatoria.matchmaking import RequestOutcome

Health = Literal["ok", "degraded", "disabled"]


class Store(Protocol):
    """What the server needs from storage. Cancellation: every async method is a checkpoint
    at most once and leaves the store consistent if cancelled."""

    @property
    def kind(self) -> str:
        """'memory' or 'redis', for logs."""
        ...

    def health(self) -> Health:
        """'disabled' (memory store), 'ok' or 'degraded' (Redis configured but failing)."""
        ...

    def gauges(self) -> dict[str, tuple[str, float]]:
        """Gauges for ``/metrics``: name -> (help, value). Cheap and synchronous."""
        ...

    # -- history --------------------------------------------------------------------------

    def record_room_message(self, room: str, message: bytes, created_ns: int) -> None:
        """Keep ``message`` in the room's history (trimmed to TTL and cap)."""
        ...

    def record_direct_message(self, a: str, b: str, message: bytes, created_ns: int) -> None:
        """Keep ``message`` in the history between ``a`` and ``b`` (order of a, b irrelevant)."""
        ...

    async def recent_room_messages(self, room: str, limit: int, before_ns: int | None = None) -> list[bytes]:
        """Up to ``limit`` messages of ``room`` newer than the TTL, newest first, strictly
        older than ``before_ns`` when given."""
        ...

    async def direct_messages(self, a: str, b: str, limit: int) -> list[bytes]:
        """The last ``limit`` messages between ``a`` and ``b`` within the TTL, oldest first."""
        ...

    # -- room registry ----------------------------------------------------------------------

    async def join_room(self, room: str, user: str) -> None: ...

    async def leave_room(self, room: str, user: str) -> None: ...

    async def rooms(self) -> list[str]:
        """Names of rooms that have members (on any instance), sorted."""
        ...

    # -- matchmaking -------------------------------------------------------------------------

    async def set_available(self, user: str) -> str | None:
        """Pool ``user``, ending its live match; returns the peer who was left, if any."""
        ...

    async def set_unavailable(self, user: str) -> None: ...

    async def request_peer(self, user: str, current_peer: str | None) -> RequestOutcome: ...

    async def hangup(self, user: str, peer: str) -> bool:
        """End the match of ``user`` and ``peer`` if it is live; True if it was."""
        ...

    async def user_gone(self, user: str) -> str | None:
        """``user`` disconnected for good: leave pool and match; returns the peer left."""
        ...
