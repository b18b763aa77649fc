"""What the ``match`` and ``search`` scenarios share: users driven by their own state machine
with a deadline, and the part that connects them and drives them.

How this works. A ``DrivenUser`` holds its state (``state``: a scenario's own names, but
``"done"`` ends the drive), a ``deadline`` (``math.inf``: none) and the WebRTC-style
handshake's bookkeeping (the peer, the role, what arrived of the offer, answer and
candidates; signaling from a user that is not yet the peer is held in ``early``, since it may
overtake its ``assign_role`` across instances). The scenario says what the user does:
``begin`` (first move once the load phase starts), ``handle`` (a message), ``on_deadline``,
``on_stop`` (the load phase ended) and ``quiesce`` (leave, then a ping whose pong ends it).

A ``DrivenPart`` owns a worker's users: it connects each one (``run_client``), waits for
the load phase, calls ``begin`` and then reads messages into ``handle`` until the user's
deadline passes (``on_deadline``) or the stop arrives (``on_stop``, once), until the user is
``"done"``; then the user is quiet and ``linger`` keeps its connection open until the part
closes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import trio
from trio_websocket import WebSocketConnection

from aleatoria.loadtest.client import Message, receive, registered, run_client, send
from aleatoria.loadtest.context import Ready, RunContext, run_clients

CANDIDATES = 3  # candidates each side sends in the handshake
EARLY_LIMIT = 8  # signaling held per user before its assign_role (oldest dropped: stray)
SIGNALING = {"webrtc_offer", "webrtc_answer", "webrtc_candidate", "hangup"}

U = TypeVar("U", bound="DrivenUser")


class DrivenUser:
    """One user's state and the handshake's bookkeeping; the scenario's subclass decides."""

    def __init__(self, ctx: RunContext, name: str) -> None:
        self.ctx = ctx
        self.name = name
        self.ws: WebSocketConnection | None = None
        self.state = "idle"
        self.deadline = math.inf
        self.peer: str | None = None
        self.role: str | None = None
        self.offer_seen = self.answer_seen = False
        self.candidates = 0
        self.assigned_ns = 0
        self.early: list[Message] = []
        self.stopping = False
        self.wake_scope: trio.CancelScope | None = None

    def wake(self) -> None:
        """The load phase ended: stop waiting (``on_stop`` follows)."""
        self.stopping = True
        if self.wake_scope is not None:
            self.wake_scope.cancel()

    async def send(self, message: Message) -> None:
        assert self.ws is not None
        await send(self.ws, message)

    def _timeout_in(self, seconds: float) -> None:
        self.deadline = trio.current_time() + seconds

    async def _send_candidates(self) -> None:
        assert self.peer is not None
        for index in range(CANDIDATES):
            await self.send(signal("webrtc_candidate", self.peer, {"candidate": f"lt-{index}"}))

    async def _handshake(self, kind: object, peer: str, payload: dict[str, Any], mismatch: str) -> bool:
        """Play this side of the call for one signaling message: an offer is answered and
        followed by the candidates, an answer and candidates are counted. False (counted as
        ``mismatch``) for one that does not fit this side's role or the call so far."""
        if kind == "webrtc_offer":
            if self.role != "polite" or payload.get("for") != self.name or self.offer_seen:
                self.ctx.stats.inc(mismatch)
                return False
            self.offer_seen = True
            await self.send(signal("webrtc_answer", peer, {"sdp": "lt-answer", "for": peer}))
            await self._send_candidates()
        elif kind == "webrtc_answer":
            if self.role != "impolite" or payload.get("for") != self.name or self.answer_seen:
                self.ctx.stats.inc(mismatch)
                return False
            self.answer_seen = True
        elif kind == "webrtc_candidate":
            self.candidates += 1
        return True

    def _hold(self, message: Message, stray: str) -> None:
        """Keep signaling that may be ahead of its ``assign_role`` (counted as ``stray`` when
        the oldest must go)."""
        if len(self.early) >= EARLY_LIMIT:
            self.early.pop(0)
            self.ctx.stats.inc(stray)
        self.early.append(message)

    # -- the scenario's ------------------------------------------------------------------

    async def begin(self) -> None:
        raise NotImplementedError

    async def quiesce(self) -> None:
        raise NotImplementedError

    async def handle(self, message: Message) -> None:
        raise NotImplementedError

    async def on_deadline(self) -> None:
        raise NotImplementedError

    async def on_stop(self) -> None:
        raise NotImplementedError

    async def linger(self, ws: WebSocketConnection) -> None:
        """After ``done``, until the part closes: keep the connection open."""
        await trio.sleep_forever()


class DrivenPart(Generic[U]):
    """A worker's driven users; see the module docstring."""

    def __init__(self, ctx: RunContext, users: Sequence[U]) -> None:
        self.ctx = ctx
        self.users = list(users)
        self.ready = Ready(len(self.users))
        self.quiet = Ready(len(self.users))  # users that reached "done" (or gave up)
        self.closing = trio.Event()

    async def run(self) -> None:
        clients = [functools.partial(self._client, user) for user in self.users]
        await run_clients(clients, self.closing)

    async def drained(self) -> None:
        await self.quiet.wait()

    def close(self) -> None:
        self.closing.set()

    async def _client(self, user: U) -> None:
        arrive = self.ready.token()
        quiet = self.quiet.token()
        try:
            session = functools.partial(self._session, user, arrive, quiet)
            await run_client(self.ctx, user.name, None, session)
        finally:
            arrive()
            quiet()

    async def _session(
        self,
        user: U,
        arrive: Callable[[], None],
        quiet: Callable[[], None],
        ws: WebSocketConnection,
    ) -> None:
        ctx = self.ctx
        user.ws = ws
        if not await registered(ws, ctx):
            return
        arrive()
        await ctx.go.wait()
        ctx.on_stop(user.wake)
        if ctx.stop.is_set():
            await user.quiesce()
        else:
            await user.begin()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._drive, user, ws, quiet)
            await self.closing.wait()
            nursery.cancel_scope.cancel()

    async def _drive(self, user: U, ws: WebSocketConnection, quiet: Callable[[], None]) -> None:
        stopped = False
        while user.state != "done":
            if user.stopping and not stopped:
                stopped = True
                await user.on_stop()
                continue
            with trio.CancelScope(deadline=user.deadline) as scope:
                user.wake_scope = scope
                message = await receive(ws)
            user.wake_scope = None
            if scope.cancelled_caught:
                if trio.current_time() >= user.deadline:
                    await user.on_deadline()
                continue
            await user.handle(message)
        quiet()
        await user.linger(ws)


def signal(kind: str, to_user: str, payload: dict[str, object]) -> Message:
    return {"type": kind, "toUser": to_user, "payload": payload}
