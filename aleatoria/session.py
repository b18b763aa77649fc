"""One user's session: the shell around the protocol core.

Data flows one way: the connection hands each frame to ``Session.handle``, which decodes it
(``codec``), types it (``requests.parse``), asks the core what it means (``core.handle``) and
carries that out: effects become sends, hub changes and store writes, calls are awaited
(store, router) and their outcomes go back to the core for the next step. Every rule lives
in the core; this module only knows how to do things. Client mistakes are ``ClientError``s,
answered in one place, ``handle``; the connection stays open unless the error says to close.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, assert_never

import trio

from aleatoria import core
from aleatoria import messages as m
from aleatoria.codec import encode, encode_reply, envelope_of, loads, now
from aleatoria.config import Config
from aleatoria.core import Call, Effect, Facts, Rules, Step
from aleatoria.errors import LIMIT_REACHED, ClientError, InvalidMessage
from aleatoria.frames import text_frame
from aleatoria.hub import Client
from aleatoria.messages import Envelope
from aleatoria.moderation import Moderation
from aleatoria.requests import (
    ChatToUser,
    ClientMessage,
    Limits,
    PoolThenRequest,
    RequestRandomPeer,
    Signal,
    UserAvailable,
    parse,
)
from aleatoria.router import Router, new_message_id
from aleatoria.safety import Ban
from aleatoria.store import Store

__all__ = ["Session", "expires_at", "new_message_id"]

log = logging.getLogger("aleatoria.session")

ROOMS_FULL_TEXT = "This server holds the most rooms it may. Join a room that exists, or try again later."


class Session:
    """Carries out the requests of one connected client."""

    # One per connection, alive as long as it is: no instance dict (~150 bytes).
    __slots__ = (
        "_facts",
        "_held",
        "_hub",
        "_limits",
        "_moderation",
        "_round_trips",
        "_router",
        "_rules",
        "_safety",
        "_stats",
        "_store",
        "client",
        "user",
    )

    def __init__(
        self,
        client: Client,
        router: Router,
        store: Store,
        config: Config,
        moderation: Moderation,
    ) -> None:
        self.client = client
        self.user = client.user
        self._router = router
        self._hub = router.hub
        self._store = store
        self._safety = store.safety
        self._stats = router.hub.stats
        self._moderation = moderation  # a stored report goes on to the webhook
        self._limits, rules = _limits_and_rules(config)
        # A store with round trips (Redis): frames are held to be joined (``_join_held``)
        # and a DM's own copy waits for the store.
        self._round_trips = store.round_trips
        self._held = False
        # Made at the first request: an idle connection never needs one (136 bytes).
        self._facts: Facts | None = None
        self._rules = rules

    # -- entry point ---------------------------------------------------------------------

    async def handle(self, frame: str | bytes | bytearray) -> None:
        """Act on one client frame. Never raises for anything the client sent."""
        stats = self._stats
        if self.client.replaced:
            return  # a successor owns the user's state now: this socket is closing (4001)
        try:
            moment = trio.current_time()
            self.client.limiter.check(moment)
            parsed = loads(frame)
            # The usual DM and call signal in one pass each; anything else, or anything
            # they leave, takes the general path below (a held frame goes first: order).
            if type(parsed) is dict and not self._held:
                kind = parsed.get("type")
                if kind == m.CHAT_MESSAGE:
                    if "room" not in parsed:  # a room's message: no facts to refresh twice
                        dm = core.plain_dm(parsed, self.facts(moment), self._limits)
                        if dm is not None:  # as the general path's DM branch
                            stats.messages_in[kind] += 1
                            self._direct(dm)
                            return
                elif type(kind) is str and kind in core.PLAIN_SIGNALS:
                    data = core.plain_signal(parsed, self.facts(moment), self._limits)
                    # Its peer gone meanwhile: the general path finds where (or says so).
                    if data is not None and self._router.send_here(parsed["toUser"], data, kind):
                        stats.messages_in[kind] += 1
                        return
            envelope = envelope_of(parsed)
            # Hostile clients choose ``type``: unknown ones share one label.
            stats.messages_in[envelope.type if envelope.type in m.CLIENT_TYPES else "unknown"] += 1
            request = parse(envelope, self._limits)
            # Only a held frame, or one to hold, takes the slow path (most frames are neither).
            if self._held or (self._round_trips and type(request) is UserAvailable):
                joined = await self._join_held(request, moment)
                if joined is None:
                    return
                request = joined
            if type(request) is Signal and request.kind != m.HANGUP:
                # Most of a call's messages: the core makes the frame, and a peer connected
                # here gets it at once, with no step to build or run (``relay_signal`` is
                # the rest of ``core.handle``'s answer, for a peer elsewhere).
                facts = self.facts(moment)
                data = core.signal_frame(request, facts)
                if data is None or self._router.send_here(request.to_user, data, request.kind):
                    return
                step = core.relay_signal(request, data, facts)
            elif type(request) is ChatToUser:
                # A DM: its effects (as ``_apply`` would carry out ``_chat_to_user``'s
                # step), without the step.
                dm = core.direct_message(request, self.facts(moment))
                if dm.to_count is not None:
                    # A partner this connection does not know as one of this hour's: the
                    # store counts it per user (with Redis a round trip, once per partner for
                    # the connection; then it is known until its hour passes and costs none).
                    self._apply(core.counted(dm.to_count, await self._perform(dm.to_count), moment))
                self._direct(dm)
                return
            else:
                step = core.handle(request, self.facts(moment))
            while True:  # ``run``, inline: this is every message's path
                for effect in step.effects:
                    self._apply(effect)
                if step.call is None or step.then is None:
                    break
                step = step.then(await self._perform(step.call))
        except ClientError as exc:
            self._refused(exc)

    # -- joining user_available_webrtc with the request after it ---------------------------------
    #
    # Clients pool themselves and ask for a peer in two frames sent back to back. With Redis
    # each is a round trip, and between the two another requester may pick the user from the
    # pool: its own request then only gets its assignment again (a "crossed" request, PROTOCOL.md
    # section 4), which clients take for no answer. Measured (reference generator, match 200,
    # one instance): 35 % of requests crossed and throughput fell to 88 matches/s. So with a
    # store that makes round trips, ``user_available_webrtc`` is held until the next frame of
    # the same read: a ``request_random_peer`` joins it into one store step (both scripts in
    # one pipeline), anything else runs after it as usual, and the end of the read
    # (``flush``) runs it alone. The client sees the same replies in the same order.

    async def _join_held(self, request: ClientMessage, moment: float) -> ClientMessage | None:
        """``request`` as it should run now, or None when it is held."""
        if self._held:
            self._held = False
            if type(request) is RequestRandomPeer and not request.wait:
                return PoolThenRequest(request.current_peer_id, request.profile)
            await self.run(core.handle(_AVAILABLE, self.facts(moment)))
        # Only a plain one (no profile: nothing for the search queue to weigh) is held.
        if type(request) is UserAvailable and request.profile.empty and self._round_trips:
            self._held = True
            return None
        return request

    async def flush(self) -> None:
        """The end of one read: run a held ``user_available_webrtc`` alone."""
        if self._held:
            self._held = False
            try:
                await self.run(core.handle(_AVAILABLE, self.facts(trio.current_time())))
            except ClientError as exc:
                self._refused(exc)

    def _refused(self, exc: ClientError) -> None:
        stats = self._stats
        stats.errors[exc.code] += 1
        if exc.close_code is not None:
            log.info("event=rate_abuse user=%s action=close code=%d", self.user, exc.close_code)
            self.client.ws.close(exc.close_code, exc.text)
        elif isinstance(exc, InvalidMessage):
            stats.messages_in["invalid"] += 1
            self._send(
                Envelope(
                    type=m.ERROR_RESPONSE,
                    from_user=m.SYSTEM,
                    to_user=self.user,
                    payload=m.ErrorResponse(error=exc.text, details=exc.details),
                    message_id="err-" + new_message_id(),
                )
            )
        else:
            self._reply(m.ERROR, m.ErrorPayload(error=exc.text, code=exc.code))

    def facts(self, moment: float) -> Facts:
        """What the core needs to know about this user at ``moment`` (trio's clock). One
        object per session: a replaced connection's rooms move to this client, so they are
        read each time."""
        facts, client = self._facts, self.client
        if facts is None:
            facts = self._facts = Facts(
                user=self.user,
                rooms=client.rooms,
                dm_partners=_NO_PARTNERS,
                clock=now,
                monotonic=moment,
                new_id=new_message_id,
                match_peer=_match_peer(self._store),
                rules=self._rules,
                blocked_by=client.blocked_by,
                match_budgets=self._hub.match_budgets,
            )
        facts.monotonic = moment
        facts.rooms = client.rooms
        facts.dm_partners = client.dm_partners or _NO_PARTNERS
        facts.shadow = client.shadow
        facts.blocked_by = client.blocked_by
        return facts

    async def run(self, step: Step) -> None:
        """Carry out ``step`` and every step after it. Raises ClientError (the core's)."""
        while True:
            for effect in step.effects:
                self._apply(effect)
            if step.call is None or step.then is None:
                return
            step = step.then(await self._perform(step.call))

    async def join(self, room: str) -> None:
        """Join ``room`` as the URL asked (at connect time). Refused (the instance holds its
        most rooms): the error is the answer, and the connection goes on."""
        try:
            if self._round_trips:
                await self.run(core.join(room))
                return
            # ``core.join``'s effects and calls, in its order, without its steps (two thirds of
            # a session's set-up): with the memory store nothing suspends, so there is no bus
            # to wait for and nobody can take the user over in between.
            self._apply(core.JoinLocal(room))
            await self._store.join_room(room, self.user)
            self._apply(core.joined(room))
        except ClientError as exc:
            self._refused(exc)

    async def adopt_rooms(self, rooms: tuple[str, ...]) -> None:
        """Rooms the user had on another instance (the store already knows them)."""
        for room in rooms:
            self._hub.join(self.client, room)
        for room in rooms:
            await self._router.room_ready(room)

    # -- effects -------------------------------------------------------------------------------

    def _apply(self, effect: Effect) -> None:
        match effect:  # the cases of every chat message first
            case core.Deliver():  # unpacked, not captured: half the cost of a class pattern
                user, data, kind, extra = effect
                self._router.send(user, data, kind, *extra)
            case core.RecordDirect():
                to, data, created_ns, own = effect
                self._record_direct(to, data, created_ns, own)
            case core.Reply():
                kind, payload, about = effect
                self._reply(kind, payload, room=about)
            case core.PeerLeft(peer):
                self._router.peer_left(peer, self.user)
            case core.RememberPartner(partner, since):
                self._remember(partner, since)
            case core.JoinLocal(room):
                client = self.client
                if not self._hub.may_open(room):
                    raise ClientError(LIMIT_REACHED, ROOMS_FULL_TEXT)
                new = room not in client.rooms and not client.replaced
                self._hub.join(client, room)
                if new:
                    self._router.presence.member(m.MEMBER_JOINED, room, self.user)
            case core.LeaveLocal(room):
                if room in self.client.rooms:
                    self._hub.leave(self.client, room)
                    self._router.presence.member(m.MEMBER_LEFT, room, self.user)
            case core.SetExpiry(exp):
                self.client.expires_at = expires_at(exp)
            case core.CountMatch(common):
                self._stats.count_match(common)
            case core.NotifyBlock(other, on):
                client = self.client
                if on:
                    self._stats.blocks += 1
                    client.blocking = {*client.blocking, other}
                elif other in client.blocking:
                    client.blocking = set(client.blocking) - {other}
                self._router.notify_block(other, self.user, on)
            case core.TypingTo(data, key, moment, room, to):
                self._typed(key, moment)
                if room is not None:
                    self._router.presence.typing(room, self.user, data)
                elif to is not None:
                    self._router.send_level2(to, data, m.TYPING)
            case core.ReportFiled(report_id, report):
                self._stats.reports[report["reason"]] += 1
                log.info(
                    "event=report_filed id=%s reporter=%s reported=%s reason=%s",
                    report_id,
                    self.user,
                    report["reported"],
                    report["reason"],
                )
                self._moderation.report_filed(report_id, report)
            case _:
                assert_never(effect)

    def _direct(self, dm: core.DirectMessage) -> None:
        """A DM's effects (as ``_apply`` would carry out ``_chat_to_user``'s step)."""
        if dm.incoming is None:
            self._router.send(self.user, dm.own, m.CHAT_MESSAGE)
            return
        self._record_direct(dm.to, dm.stored, dm.created_ns, dm.own)
        self._router.send(dm.to, dm.incoming, m.CHAT_MESSAGE)

    def _record_direct(self, to: str, data: bytes, created_ns: int, own: bytes) -> None:
        """Store a DM and send the sender its copy, its acknowledgement: at once in memory
        (stored once recorded), once Redis has it with a store that has round trips."""
        if self._round_trips:
            self._store.record_direct_message(self.user, to, data, created_ns, self._on_stored(own))
            return
        self._store.record_direct_message(self.user, to, data, created_ns)
        self.client.ws.send(text_frame(own))
        self._stats.messages_out[m.CHAT_MESSAGE] += 1

    def _on_stored(self, own: bytes) -> Any:
        # The sender's copy is its acknowledgement: it leaves once the store has the message.
        ws, stats = self.client.ws, self._stats
        frame = text_frame(own)

        def stored() -> None:
            ws.send(frame)
            stats.messages_out[m.CHAT_MESSAGE] += 1

        return stored

    def _typed(self, key: str, moment: float) -> None:
        """Remember a ``typing`` sent to ``key`` (one a second per target); bounded: targets
        quiet for a second are forgotten once there are a few."""
        facts = self._facts
        assert facts is not None  # a typing effect comes from a request, which made it
        sent = facts.typing_sent
        if not isinstance(sent, dict):
            sent = facts.typing_sent = {}
        if len(sent) >= _TYPING_TARGETS:
            for old in [k for k, when in sent.items() if moment - when >= core.TYPING_INTERVAL]:
                del sent[old]
        sent[key] = moment

    def _remember(self, partner: str, since: float) -> None:
        """Keep ``partner`` in the connection's cache of this hour's partners (the store has
        counted it): later DMs to it need no store call."""
        facts = self._facts
        assert facts is not None  # a partner comes from a request, which made it
        moment = facts.monotonic
        partners = self.client.dm_partners
        if partners is None:
            partners = self.client.dm_partners = {}
        for old in [p for p, first in partners.items() if moment - first >= core.HOUR]:
            del partners[old]  # bounded: at most new_dm_per_hour stay (the store counted each)
        partners[partner] = since

    # -- calls ---------------------------------------------------------------------------------

    async def _perform(self, call: Call) -> Any:
        store, user = self._store, self.user
        match call:  # the cases of every message first: signals, then matches
            case core.Broadcast():  # unpacked, not captured: half the cost of a class pattern
                room, data, created_ns = call
                await self._router.broadcast(room, data, created_ns, user)
                return None
            case core.Relay():
                to, data, kind, extra = call
                return await self._router.send_checked(to, data, kind, *extra, sender=user)
            case core.RequestPeer(current, profile):
                return await store.request_peer(user, current, profile)
            case core.Hangup(peer):
                return await store.hangup(user, peer)
            case core.SetAvailable(profile):
                return await store.set_available(user, profile)
            case core.PoolThenRequestPeer(current, profile):
                return await store.pool_then_request_peer(user, current, profile)
            case core.RoomReady(room):
                await self._router.room_ready(room)
                live = self._hub.clients.get(user)
                return live is not None and room in live.rooms
            case core.StoreJoin(room):
                await store.join_room(room, user)
                return None
            case core.StoreLeave(room):
                await store.leave_room(room, user)
                return None
            case core.RoomDirectory(limit, prefix):
                return await store.list_rooms(limit, prefix)
            case core.RoomMembers(room, limit):
                return await store.room_members(room, limit)
            case core.Counts():
                return await store.stats()
            case core.SetUnavailable():
                await store.set_unavailable(user)
                return None
            case core.JoinSearch(current, profile):
                return await store.search(user, current, profile)
            case core.LeaveSearch():
                await store.cancel_search(user)
                return None
            case core.RecentHistory(room, limit, before_ns, after_ns, max_bytes):
                return await store.recent_room_messages(room, limit, before_ns, after_ns, max_bytes)
            case core.DirectHistory(other, limit, max_bytes):
                return await store.direct_messages(user, other, limit, max_bytes)
            case core.StoreBlock(other):
                return await self._safety.block(user, other)
            case core.StoreUnblock(other):
                await self._safety.unblock(user, other)
                return None
            case core.BlockedList():
                return await self._safety.blocked(user)
            case core.RoomHistories(rooms, limit, max_bytes):
                found: list[bytes] = []
                for room in rooms:
                    read = await store.recent_room_messages(room, limit, max_bytes=max_bytes)
                    found += core.upto(read, max_bytes)
                return found
            case core.MatchBetween(other):
                return await store.match_between(user, other)
            case core.CountPartner(partner, limit):
                return await self._safety.new_dm_partner(user, partner, limit)
            case core.CountReport(limit):
                return await self._safety.count_report(user, limit)
            case core.StoreReport(report):
                report["instance"] = store.instance
                return await self._safety.add_report(report, time.time())
            case core.ShadowBan(other, seconds, reason):
                now = time.time()
                await self._moderation.apply(Ban(other, now + seconds, reason, shadow=True, created=now))
                return None
            case _:
                assert_never(call)

    # -- replies -----------------------------------------------------------------------------

    def reply(self, kind: str, payload: Any) -> None:
        """Send this user a server message (``fromUser`` system): the ``welcome``."""
        self._reply(kind, payload)

    def _reply(self, kind: str, payload: Any, *, room: str | None = None) -> None:
        self.client.ws.send(text_frame(encode_reply(kind, self.user, payload, room)))
        self._stats.messages_out[kind] += 1

    def _send(self, env: Envelope) -> None:
        self.client.ws.send(text_frame(encode(env)))
        self._stats.messages_out[env.type] += 1


_NO_PARTNERS: dict[str, float] = {}
_AVAILABLE = UserAvailable()
_TYPING_TARGETS = 16  # past this many, targets quiet for a second are forgotten


def _limits_and_rules(config: Config) -> tuple[Limits, Rules]:
    """The request limits and the core's rules, once per configuration (not per session).
    Kept by identity: hashing a Config (every setting) cost ~5 us per connection."""
    global _last_rules
    if _last_rules is not None and _last_rules[0] is config:
        return _last_rules[1], _last_rules[2]
    limits = Limits(
        max_id_chars=config.max_id_chars,
        max_content_chars=config.max_content_chars,
        max_message_id_chars=config.max_message_id_chars,
    )
    rules = Rules(
        max_rooms_per_user=config.max_rooms_per_user,
        new_dm_per_hour=config.new_dm_per_hour,
        reports_per_hour=config.reports_per_hour,
        max_payload_bytes=config.max_payload_bytes,
        auth_secret=config.auth_secret,
        auto_shadow_reports=config.auto_shadow_reports,
        match_rate=config.match_rate,
        match_burst=config.match_burst,
        ice=config.ice,
        history_reply_bytes=config.outbox_bytes,
    )
    _last_rules = (config, limits, rules)
    return limits, rules


_last_rules: tuple[Config, Limits, Rules] | None = None


def _match_peer(store: Store) -> Callable[[str], str | None]:
    """``store.match_peer``, one bound method per store rather than one per session (64 bytes
    a connection)."""
    global _last_match_peer
    if _last_match_peer is None or _last_match_peer[0] is not store:
        _last_match_peer = (store, store.match_peer)
    return _last_match_peer[1]


_last_match_peer: tuple[Store, Callable[[str], str | None]] | None = None


def expires_at(exp: int) -> float:
    """A token's ``exp`` (unix seconds) on trio's clock."""
    return trio.current_time() + (exp - time.time())
