"""``match``: N users cycle through random matching and a WebRTC-style handshake.

Each user: ``user_available_webrtc`` → ``request_random_peer`` → on ``assign_role``
the impolite side (the requester) sends ``webrtc_offer`` and 3 ``webrtc_candidate``s,
the polite side answers with ``webrtc_answer`` and 3 candidates; once the impolite side
has the answer and all 3 candidates it sends ``hangup`` and both start again.
``no_peer_available`` is retried after a short random back-off.

How the checks work: every user tracks its own live match. An ``assign_role`` naming a
*different* peer while a match is live is a double match (``match.double``); the same
peer again is the server re-sending the current role, which the protocol allows
(``match.repeat_assign``). Offers and answers carry ``{"for": <recipient>}``, and an
offer reaching an impolite user, an answer reaching a polite one, or a ``for`` naming
someone else means the two sides disagree on the pairing (``match.mismatch``).
Signaling from a user who is not the current peer is held briefly (it may overtake its
``assign_role`` across server instances) and counted as ``match.stray`` if no match with
that user follows. A match that makes no progress for ``match_timeout`` is abandoned
with a ``hangup`` (``match.stalled``). When the load phase ends, idle users leave the
pool and send a ``ping``; the ``pong`` proves the server processed the leave, and any
match handed out before it is finished first, so the drain ends with nobody mid-call.
Figures also: ``match.completed`` (counted by the impolite side), ``match.no_peer``,
``match.peer_left``, ``match.incomplete`` (hangup before the polite side saw the
offer and 3 candidates), ``match.request_timeouts``; latencies ``match.wait``
(available → assigned) and ``match.setup`` (assigned → answer and candidates back).
"""

from __future__ import annotations

from aleatoria.loadtest.client import Message, note_error
from aleatoria.loadtest.context import RunContext
from aleatoria.loadtest.payload import now_ns
from aleatoria.loadtest.scenarios.driven import CANDIDATES, SIGNALING, DrivenPart, DrivenUser, signal


class MatchUser(DrivenUser):
    """One user's view of its own matching state (idle, requesting, backoff, pause, matched,
    quiescing, done); driven by ``MatchPart``."""

    def __init__(self, ctx: RunContext, name: str) -> None:
        super().__init__(ctx, name)
        self.available_ns = 0

    async def begin(self) -> None:
        await self.become_available()

    # -- the cycle ------------------------------------------------------------------

    async def become_available(self) -> None:
        await self.send({"type": "user_available_webrtc"})
        self.available_ns = now_ns()
        await self.request()

    async def request(self) -> None:
        self.state = "requesting"
        self._timeout_in(self.ctx.options.match_timeout)
        await self.send({"type": "request_random_peer", "payload": {}})

    async def quiesce(self) -> None:
        """Leave the pool; the pong to the ping that follows means nothing can match us."""
        self.state = "quiescing"
        self._timeout_in(self.ctx.options.match_timeout)
        await self.send({"type": "user_unavailable_webrtc"})
        await self.send({"type": "ping"})

    async def after_match(self) -> None:
        self.peer = self.role = None
        if self.stopping:
            await self.quiesce()
        elif self.ctx.options.match_pause > 0:
            self.state = "pause"
            self._timeout_in(self.ctx.options.match_pause)
        else:
            await self.become_available()

    async def on_deadline(self) -> None:
        stats = self.ctx.stats
        if self.state == "requesting":
            stats.inc("match.request_timeouts")
            await (self.quiesce() if self.stopping else self.request())
        elif self.state == "backoff":
            await (self.quiesce() if self.stopping else self.request())
        elif self.state == "pause":
            await (self.quiesce() if self.stopping else self.become_available())
        elif self.state == "matched":
            stats.inc("match.stalled")
            assert self.peer is not None
            await self.send({"type": "hangup", "toUser": self.peer, "payload": {}})
            await self.after_match()
        elif self.state == "quiescing":
            stats.inc("match.quiesce_timeouts")
            self.state = "done"

    async def on_stop(self) -> None:
        """The load phase ended: idle users leave the pool; matched ones finish first."""
        if self.state in {"idle", "backoff", "pause"}:
            await self.quiesce()

    # -- messages -------------------------------------------------------------------

    async def handle(self, message: Message) -> None:
        kind = message.get("type")
        stats = self.ctx.stats
        if kind == "assign_role":
            await self.on_assign(message)
        elif kind == "no_peer_available":
            stats.inc("match.no_peer")
            if self.state == "requesting":
                if self.stopping:
                    await self.quiesce()
                else:
                    self.state = "backoff"
                    self._timeout_in(self.ctx.rng.uniform(0.01, 0.1))
        elif kind in SIGNALING:
            await self.on_signaling(message)
        elif kind == "pong":
            if self.state == "quiescing":
                self.state = "done"
        elif note_error(self.ctx, message) == "peer_unavailable" and self.state == "matched":
            stats.inc("match.peer_unavailable")
            await self.after_match()

    async def on_assign(self, message: Message) -> None:
        stats = self.ctx.stats
        payload = message.get("payload")
        payload = payload if isinstance(payload, dict) else {}
        role, peer = payload.get("role"), payload.get("peerId")
        if role not in {"polite", "impolite"} or not isinstance(peer, str) or peer == self.name:
            stats.inc("match.bad_assign")
            return
        if self.state == "matched":
            if peer == self.peer:
                stats.inc("match.repeat_assign")
                if role != self.role:
                    stats.inc("match.mismatch")
            else:
                stats.inc("match.double")
            return
        self.state = "matched"
        self.peer, self.role = peer, role
        self.offer_seen = self.answer_seen = False
        self.candidates = 0
        self.assigned_ns = now_ns()
        stats.observe("match.wait", self.assigned_ns - self.available_ns, self.assigned_ns)
        self._timeout_in(self.ctx.options.match_timeout)
        if role == "impolite":
            await self.send(signal("webrtc_offer", peer, {"sdp": "lt-offer", "for": peer}))
            await self._send_candidates()
        early, self.early = self.early, []
        for held in early:
            if held.get("fromUser") == peer and self.state == "matched" and self.peer == peer:
                await self.on_signaling(held)
            else:
                stats.inc("match.stray")

    async def on_signaling(self, message: Message) -> None:
        stats = self.ctx.stats
        kind = message.get("type")
        origin = message.get("fromUser")
        peer = self.peer
        if self.state != "matched" or peer is None or origin != peer:
            self._hold(message, "match.stray")
            return
        payload = message.get("payload")
        payload = payload if isinstance(payload, dict) else {}
        self._timeout_in(self.ctx.options.match_timeout)  # progress
        if kind == "hangup":
            if payload.get("reason") == "peer_left":
                stats.inc("match.peer_left")
            elif self.role == "polite" and not (self.offer_seen and self.candidates >= CANDIDATES):
                stats.inc("match.incomplete")
            await self.after_match()
            return
        if not await self._handshake(kind, peer, payload, "match.mismatch"):
            return
        if self.role == "impolite" and self.answer_seen and self.candidates >= CANDIDATES:
            done = now_ns()
            stats.observe("match.setup", done - self.assigned_ns, done)
            stats.inc("match.completed")
            await self.send({"type": "hangup", "toUser": peer, "payload": {}})
            await self.after_match()


class MatchPart(DrivenPart[MatchUser]):
    """The match users this worker owns; see the module docstring."""

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx, [MatchUser(ctx, ctx.user_id("u", u)) for u in ctx.share(ctx.options.users)])

    def account(self) -> None:
        self.ctx.stats.inc("match.stray", sum(len(user.early) for user in self.users))
