"""Resume after a dropped connection (PROTOCOL.md section 15): kept sessions and tokens.

How this works. Every level-2 connection gets a resume token in its ``welcome``
(``secrets.token_urlsafe``: unguessable; never logged). When such a connection drops
without a close frame from the client (close code 1006) or with 1001, the server keeps
the session instead of ending it: the user's ``Client`` stays in the hub with its rooms,
and the store keeps its presence, pool place and live match, so nobody notices. Its
WebSocket is swapped for a ``KeptOutbox``, which keeps every frame sent to it in order
(room fan-out, direct frames, relayed signaling) up to ``outbox_frames`` frames and
``outbox_bytes`` bytes behind the first, as a live outbox. A timer task in
the server's connection nursery waits for the resume window to pass; then the leave
happens as for any disconnect (members told, pool left, ``hangup peer_left``).

A reconnect of the same user with ``resume=<token>`` takes the kept session over: the
token is used up, the timer is stopped, the new connection replaces the kept client in
the hub (its rooms move, as for a replaced connection) and hears ``welcome`` with
``resumed: true, missed: N``, then the N kept frames in order, then live traffic -- all in
one synchronous step, so no live frame can come between. A kept session that overflows
its outbox, is closed by the server (ban, token expiry, shutdown) or is not resumed in
time ends at once; a resume with a wrong, used or foreign token gets a fresh session.

This module holds the bookkeeping; ``server.py`` decides when to keep and runs the timer.
"""

from __future__ import annotations

import hmac
import math
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator

import attrs
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from aleatoria.frames import ABNORMAL, GOING_AWAY, TRY_AGAIN_LATER, text_frame
from aleatoria.hub import Client

# Close codes after which a level-2 session is kept: no close frame from the client
# (1006, also a socket error) or "going away" (1001: a client, or our idle timeout).
KEEP_CODES = frozenset({ABNORMAL, GOING_AWAY})

# Why a resume failed (the label of aleatoria_resume_failures_total).
UNKNOWN = "unknown"  # never issued here, or malformed
OTHER_USER = "other_user"  # a kept session's token, presented by another user
EXPIRED = "expired"  # the window passed
OVERFLOW = "overflow"  # more frames were addressed to it than the outbox keeps
# What an empty ``resume=`` presents: a token no session ever has (``token_urlsafe(24)`` is
# 32 characters), so it is refused as unknown like any other (PROTOCOL.md section 15).
NO_SUCH_TOKEN = "-"
ENDED = "ended"  # used already, or the session ended otherwise (closed by the server)
_REMEMBERED = 10_000  # ended tokens remembered for the failure reason


class KeptOutbox:
    """Stands in for the WebSocket of a dropped level-2 session: keeps the frames sent to
    it, in order, up to ``limit`` frames and ``limit_bytes`` bytes behind the first (the
    bounds of a live outbox, PROTOCOL.md section 16: without the bytes one, a kept session
    held 256 relayed 64 KiB offers, 16 MB, where a live one holds 1 MiB); one more ends the
    session (``on_end``). The verbs are the WebSocket's that the hub, router and supervisor
    use."""

    __slots__ = (
        "close_code",
        "close_reason",
        "count",
        "frames",
        "last_seen",
        "limit",
        "limit_bytes",
        "on_end",
        "size",
    )

    def __init__(self, limit: int, limit_bytes: int, on_end: Callable[[str], None]) -> None:
        self.frames: list[tuple[bytes, int]] = []
        self.count = 0
        self.size = 0  # bytes behind the first frame
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.on_end = on_end
        self.close_code: int | None = None
        self.close_reason = ""
        self.last_seen = math.inf  # never idle: the window bounds it

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    def send(self, data: bytes, frames: int = 1) -> None:
        if self.close_code is not None:
            return
        size = self.size + len(data) if self.frames else 0
        if self.count + frames > self.limit or size > self.limit_bytes:
            self.frames.clear()  # never half-replayed
            self.close_code, self.close_reason = TRY_AGAIN_LATER, "too many frames waiting"
            self.on_end(OVERFLOW)
            return
        self.frames.append((data, frames))
        self.count += frames
        self.size = size

    send_now = send

    def send_text(self, payload: bytes) -> None:
        self.send(text_frame(payload))

    def flush(self) -> None:
        pass

    def ping(self) -> None:
        pass

    def close(self, code: int, reason: str = "") -> None:
        """The server ends the session (a ban, token expiry, shutdown, a successor)."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self.on_end(ENDED)

    def abort(self) -> None:
        self.close(ABNORMAL, "aborted")


@attrs.define(eq=False)
class KeptSession:
    """One dropped level-2 session waiting for its user to come back."""

    client: Client
    token: str
    outbox: KeptOutbox
    scope: trio.CancelScope  # its timer's: cancelled to end it early or to resume it
    resumed: bool = False
    ended: bool = False
    reason: str = EXPIRED  # why it ended, if it does

    @property
    def over(self) -> bool:
        """Resumed, or ended (its leave is someone's to do, or done)."""
        return self.resumed or self.ended


class Resumes:
    """The resume tokens of this instance's level-2 sessions and its kept sessions."""

    def __init__(self, window: float, outbox_frames: int, outbox_bytes: int) -> None:
        self.window = window
        self.outbox_frames = outbox_frames
        self.outbox_bytes = outbox_bytes
        self._tokens: dict[str, tuple[str, Client]] = {}  # user -> (token, its session)
        self._owners: dict[str, str] = {}  # token -> user
        self.kept: dict[str, KeptSession] = {}  # user -> its kept session
        self._ended: OrderedDict[str, str] = OrderedDict()  # token -> why it is no use
        self.all_ended = trio.Event()
        self.all_ended.set()
        self.resumed = 0
        self.failures: Counter[str] = Counter()
        self.replayed = 0
        self.expired = 0
        self.not_kept = 0  # dropped sessions ended at once: the kept sessions' cap was reached

    # -- tokens -------------------------------------------------------------------------

    def issue(self, client: Client) -> str:
        """A new token for ``client``'s session; the user's previous one is no use now."""
        old = self._tokens.get(client.user)
        if old is not None:
            self._retire(old[0], ENDED)
        token = secrets.token_urlsafe(24)
        self._tokens[client.user] = (token, client)
        self._owners[token] = client.user
        return token

    def discard(self, client: Client) -> None:
        """``client``'s session ended for good: its token is no use any more."""
        held = self._tokens.get(client.user)
        if held is not None and held[1] is client:
            self._retire(held[0], ENDED)

    def _retire(self, token: str, reason: str) -> None:
        user = self._owners.pop(token, None)
        if user is not None and self._tokens.get(user, ("",))[0] == token:
            del self._tokens[user]
        self._ended[token] = reason
        if len(self._ended) > _REMEMBERED:
            self._ended.popitem(last=False)

    def live_token(self, client: Client) -> str | None:
        held = self._tokens.get(client.user)
        return held[0] if held is not None and held[1] is client else None

    def check(self, user: str, token: str) -> str | None:
        """Whether ``token`` resumes ``user``'s session (None) or why not."""
        owner = self._owners.get(token)
        if owner is None:
            return self._ended.get(token, UNKNOWN)
        if owner != user:
            return OTHER_USER
        return None

    def failed(self, reason: str) -> None:
        self.failures[reason] += 1

    # -- kept sessions ------------------------------------------------------------------

    def keep(self, client: Client) -> KeptSession | None:
        """Keep ``client``'s session (its connection dropped): its socket becomes an outbox.
        None when it has no token (not level 2)."""
        token = self.live_token(client)
        if token is None:
            return None
        scope = trio.CancelScope(deadline=trio.current_time() + self.window)
        kept: KeptSession

        def on_end(reason: str) -> None:
            if not kept.resumed:
                kept.reason = reason
                kept.scope.cancel()

        kept = KeptSession(client, token, KeptOutbox(self.outbox_frames, self.outbox_bytes, on_end), scope)
        self.kept[client.user] = kept
        self.all_ended = trio.Event()
        return kept

    def take(self, user: str, token: str) -> KeptSession | None:
        """The kept session ``token`` resumes (used up now), or None."""
        kept = self.kept.get(user)
        # Bytes: compare_digest refuses a str with a non-ASCII character (TypeError), and
        # another instance asks with whatever token its client presented.
        if (
            kept is None
            or kept.over
            or not hmac.compare_digest(kept.token.encode(), token.encode(errors="replace"))
        ):
            return None
        if kept.scope.cancel_called or trio.current_time() >= kept.scope.deadline:
            return None  # over already (overflow, window), its end just not run yet
        kept.resumed = True
        kept.scope.cancel()
        self._release(kept)
        self._retire(token, ENDED)
        self.resumed += 1
        self.replayed += kept.outbox.count
        return kept

    def take_live(self, client: Client) -> None:
        """``client``'s live session is resumed from another connection (its drop was not
        noticed yet): its token is used up."""
        token = self.live_token(client)
        if token is not None:
            self._retire(token, ENDED)
        self.resumed += 1

    def reason_for(self, user: str) -> str:
        """Why ``user``'s current token, presented now, resumes nothing."""
        kept = self.kept.get(user)
        if kept is None or kept.over:
            return UNKNOWN
        return kept.reason if kept.scope.cancel_called else EXPIRED

    def end(self, kept: KeptSession) -> None:
        """``kept`` ended without a resume (its leave follows, the caller's to do)."""
        if kept.over:
            return
        kept.ended = True
        kept.scope.cancel()
        self._release(kept)
        self._retire(kept.token, kept.reason)
        if kept.reason == EXPIRED:
            self.expired += 1

    def _release(self, kept: KeptSession) -> None:
        if self.kept.get(kept.client.user) is kept:
            del self.kept[kept.client.user]
        if not self.kept:
            self.all_ended.set()

    def end_all(self) -> None:
        """End every kept session now (shutdown)."""
        for kept in list(self.kept.values()):
            kept.outbox.close(GOING_AWAY, "server shutting down")


class ResumeCollector(Collector):
    """/metrics of resumes: sessions resumed, failures by reason, frames replayed, sessions
    expired, and the sessions kept now."""

    def __init__(self, resumes: Resumes) -> None:
        self._resumes = resumes

    def collect(self) -> Iterator[Metric]:
        r = self._resumes
        yield CounterMetricFamily("aleatoria_sessions_resumed", "level-2 sessions resumed", value=r.resumed)
        failures = CounterMetricFamily(
            "aleatoria_resume_failures",
            "resume attempts that got a fresh session, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(r.failures.items()):
            failures.add_metric([reason], count)
        yield failures
        yield CounterMetricFamily(
            "aleatoria_frames_replayed",
            "frames kept for dropped sessions and replayed on resume",
            value=r.replayed,
        )
        yield CounterMetricFamily(
            "aleatoria_sessions_expired", "kept sessions whose resume window passed", value=r.expired
        )
        yield GaugeMetricFamily(
            "aleatoria_sessions_kept", "dropped level-2 sessions kept for resume", value=len(r.kept)
        )
        yield CounterMetricFamily(
            "aleatoria_sessions_not_kept",
            "dropped level-2 sessions ended at once: their address (or the server) had its cap kept",
            value=r.not_kept,
        )
