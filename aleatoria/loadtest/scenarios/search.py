"""``search``: N users with interests (and languages) in the search queue, PROTOCOL.md
section 12: search, talk briefly, press "Next", again, for ``duration``.

Each user has a profile drawn once (``searchcheck.draw_profile``: ``interests_per_user``
tags of a Zipf-like popularity among ``vocabulary``, one of ``languages``) and cycles:
``request_random_peer {wait: true, interests, language}`` → ``searching`` → ``assign_role``
→ the handshake of the ``match`` scenario (the impolite side offers and sends 3 candidates,
the polite side answers with 3) → ``match_pause`` seconds of "talk" → the impolite side
presses "Next": ``request_random_peer {wait: true, currentPeerId, …}``, which ends the match
(the polite side hears ``hangup peer_left``, and searches again itself). A search that times
out (``no_peer_available``) searches again.

Per user it checks what one user can see: an ``assign_role`` naming another peer while in a
match is a double match (``search.double``); offers and answers that disagree on the roles
are ``search.mismatch`` (as in ``match``). Every search is recorded as a row for the checks
that need all users at once (``searchcheck.analyse``: pairings, rematches, fairness).
At the end of the load phase users in the queue send ``cancel_search`` and a ``ping``; the
``pong`` means the server let them go; matches under way finish first.
Counters: ``search.matches`` (counted by the impolite side), ``search.talks`` (handshakes
done), ``search.timeouts``, ``search.with_interests`` / ``search.fallbacks`` (matched sides
that gave interests / of them, with none in common), ``search.peer_left``,
``search.stalled``, ``search.request_timeouts`` (no ``searching`` within ``match_timeout``),
``search.after_cancel`` (a match that crossed our ``cancel_search``), ``search.stray``;
latencies ``search.wait`` (request sent → ``assign_role``) and ``search.setup``.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

from trio_websocket import WebSocketConnection

from aleatoria.loadtest.client import Message, note_error, receive
from aleatoria.loadtest.context import RunContext
from aleatoria.loadtest.payload import now_ns
from aleatoria.loadtest.scenarios.driven import CANDIDATES, SIGNALING, DrivenPart, DrivenUser, signal
from aleatoria.loadtest.searchcheck import Row, draw_profile


class SearchUser(DrivenUser):
    """One user's view of its searches and matches (idle, requesting, queued, matched,
    talking, quiescing, done); driven by ``SearchPart``."""

    def __init__(self, ctx: RunContext, index: int) -> None:
        super().__init__(ctx, ctx.user_id("s", index))
        options = ctx.options
        rng = random.Random(f"{options.run_id}-{index}")  # the same profile in every run with this id
        self.interests, self.language = draw_profile(
            rng, options.vocabulary, options.interests_per_user, options.zipf, options.language_choices()
        )
        self.row: Row | None = None  # the current (or, while quiescing, the last) search
        self.sent_ns = 0
        self.match_id: str | None = None

    async def begin(self) -> None:
        await self.search()

    async def linger(self, ws: WebSocketConnection) -> None:
        while True:  # until the part closes: a match announced after our pong is refused
            await self.handle(await receive(ws))

    def _close_row(self, end: str, left: float | None) -> None:
        row, self.row = self.row, None
        if row is None:
            return
        row.end, row.left = end, left
        self.ctx.stats.record("search", row.to_list())

    # -- the cycle ------------------------------------------------------------------

    async def search(self, current_peer: str | None = None) -> None:
        payload: dict[str, Any] = {"wait": True}
        if self.interests:
            payload["interests"] = self.interests
        if self.language is not None:
            payload["language"] = self.language
        if current_peer is not None:
            payload["currentPeerId"] = current_peer
        self.peer = self.role = self.match_id = None
        self.row = Row(self.name, self.interests, self.language, sent=time.time())
        self.state = "requesting"
        self.sent_ns = now_ns()
        self._timeout_in(self.ctx.options.match_timeout)
        await self.send({"type": "request_random_peer", "payload": payload})

    async def quiesce(self) -> None:
        """Leave the queue (or the match); the pong to the ping that follows means the
        server processed it."""
        if self.state in {"requesting", "queued"} and self.row is not None:
            # Recorded at the end of the run (``SearchPart.account``): a match that crossed
            # the cancel may still be announced, even after the pong, and replaces it.
            self.row.end, self.row.left = "cancel", time.time()
            await self.send({"type": "cancel_search"})
        elif self.state in {"matched", "talking"} and self.peer is not None:
            await self.send({"type": "hangup", "toUser": self.peer, "payload": {}})
        self.state = "quiescing"
        self._timeout_in(self.ctx.options.match_timeout)
        await self.send({"type": "ping"})

    async def next_or_stop(self) -> None:
        """ "Next" after a match (ours to end): search again naming the peer, or stop."""
        if self.stopping:
            await self.quiesce()
        else:
            await self.search(self.peer)

    async def after_hangup(self) -> None:
        """The peer ended the match: search again (the match is over: no currentPeerId)."""
        if self.stopping:
            self.state = "idle"
            self.peer = None
            await self.quiesce()
        else:
            await self.search()

    async def on_deadline(self) -> None:
        stats = self.ctx.stats
        if self.state == "requesting":
            stats.inc("search.request_timeouts")
            self._close_row("lost", None)
            await (self.quiesce() if self.stopping else self.search())
        elif self.state == "matched":
            stats.inc("search.stalled")
            await self.next_or_stop()
        elif self.state == "talking":
            await self.next_or_stop()
        elif self.state == "quiescing":
            stats.inc("search.quiesce_timeouts")
            self.state = "done"

    async def on_stop(self) -> None:
        """The load phase ended: searchers leave the queue; a finished talk ends now."""
        if self.state in {"idle", "requesting", "queued", "talking"}:
            await self.quiesce()

    # -- messages -------------------------------------------------------------------

    async def handle(self, message: Message) -> None:
        kind = message.get("type")
        stats = self.ctx.stats
        if kind == "searching":
            if self.state == "requesting" and self.row is not None:
                self.row.joined = time.time()
                self.state = "queued"
                self.deadline = math.inf  # the server answers a timeout itself
            else:
                stats.inc("search.unexpected_searching")
        elif kind == "assign_role":
            await self.on_assign(message)
        elif kind == "no_peer_available":
            if self.state in {"requesting", "queued"}:
                stats.inc("search.timeouts")
                self._close_row("timeout", time.time())
                await (self.quiesce() if self.stopping else self.search())
        elif kind in SIGNALING:
            await self.on_signaling(message)
        elif kind == "pong":
            if self.state == "quiescing":
                self.state = "done"
        elif note_error(self.ctx, message) == "peer_unavailable" and self.state in {"matched", "talking"}:
            stats.inc("search.peer_unavailable")
            await self.after_hangup()

    async def on_assign(self, message: Message) -> None:
        stats = self.ctx.stats
        payload = message.get("payload")
        payload = payload if isinstance(payload, dict) else {}
        role, peer = payload.get("role"), payload.get("peerId")
        match_id, common = payload.get("matchId"), payload.get("commonInterests")
        if role not in {"polite", "impolite"} or not isinstance(peer, str) or peer == self.name:
            stats.inc("search.bad_assign")
            return
        if self.state in {"matched", "talking"}:
            if peer == self.peer and match_id == self.match_id:
                stats.inc("search.repeat_assign")
            else:
                stats.inc("search.double")
            return
        if not isinstance(common, list) or not isinstance(match_id, str):
            stats.inc("search.bad_assign")  # the server must send both (section 12)
        row = self.row
        if self.state in {"quiescing", "done"}:
            # A match that crossed our cancel_search: record it as what it was, then leave.
            stats.inc("search.after_cancel")
            if row is not None and row.end == "cancel":
                self._fill(row, peer, role, match_id, common)
            await self.send({"type": "hangup", "toUser": peer, "payload": {}})
            return
        if self.state not in {"requesting", "queued"} or row is None:
            stats.inc("search.unexpected_assign")
            return
        if self.state == "requesting":
            stats.inc("search.assign_before_searching")
        self._fill(row, peer, role, match_id, common)
        self.row = None
        self.state = "matched"
        self.peer, self.role, self.match_id = peer, role, match_id if isinstance(match_id, str) else None
        self.offer_seen = self.answer_seen = False
        self.candidates = 0
        self.assigned_ns = now_ns()
        stats.observe("search.wait", self.assigned_ns - self.sent_ns, self.assigned_ns)
        if role == "impolite":
            stats.inc("search.matches")
        if self.interests:
            stats.inc("search.with_interests")
            if common == []:
                stats.inc("search.fallbacks")
        self._timeout_in(self.ctx.options.match_timeout)
        if role == "impolite":
            await self.send(signal("webrtc_offer", peer, {"sdp": "lt-offer", "for": peer}))
            await self._send_candidates()
        early, self.early = self.early, []
        for held in early:
            if held.get("fromUser") == peer and self.state == "matched" and self.peer == peer:
                await self.on_signaling(held)
            else:
                stats.inc("search.stray")

    def _fill(self, row: Row, peer: str, role: str, match_id: Any, common: Any) -> None:
        row.peer, row.role = peer, role
        row.match_id = match_id if isinstance(match_id, str) else None
        row.common = [str(tag) for tag in common] if isinstance(common, list) else None
        self.row = row
        self._close_row("match", time.time())

    async def on_signaling(self, message: Message) -> None:
        stats = self.ctx.stats
        kind = message.get("type")
        origin = message.get("fromUser")
        peer = self.peer
        if self.state in {"quiescing", "done"}:
            return  # the run is ending (a crossed match's offer, a peer's last hangup)
        if self.state not in {"matched", "talking"} or peer is None or origin != peer:
            if kind == "hangup":
                return  # from a former peer (a Next that crossed ours): nothing to do
            self._hold(message, "search.stray")
            return
        payload = message.get("payload")
        payload = payload if isinstance(payload, dict) else {}
        if kind == "hangup":
            if payload.get("reason") == "peer_left":
                stats.inc("search.peer_left")
            await self.after_hangup()
            return
        if self.state != "matched":
            return
        self._timeout_in(self.ctx.options.match_timeout)  # progress
        if not await self._handshake(kind, peer, payload, "search.mismatch"):
            return
        if self.role == "impolite" and self.answer_seen and self.candidates >= CANDIDATES:
            done = now_ns()
            stats.observe("search.setup", done - self.assigned_ns, done)
            stats.inc("search.talks")
            self.state = "talking"
            if self.stopping:
                await self.quiesce()
            else:
                self._timeout_in(self.ctx.options.match_pause)
        elif self.role == "polite" and self.offer_seen and self.candidates >= CANDIDATES:
            self.state = "talking"  # until the impolite side presses Next
            self.deadline = math.inf


class SearchPart(DrivenPart[SearchUser]):
    """The search users this worker owns; see the module docstring."""

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx, [SearchUser(ctx, index) for index in ctx.share(ctx.options.users)])

    def account(self) -> None:
        stats = self.ctx.stats
        stats.inc("search.stray", sum(len(user.early) for user in self.users))
        for user in self.users:
            row = user.row
            if row is not None:  # cancelled at the end, or never answered
                user._close_row(row.end if row.end == "cancel" else "open", row.left)
