"""One user's session: every client message is routed and answered here.

Data flows one way: the connection hands each frame to ``Session.handle``, which decodes it
(``codec``), checks it (``limits``), acts on the hub and the store, and delivers frames
through the router (to this instance's sockets, or through Redis to another instance's).
Client mistakes raise ``ClientError``/``InvalidMessage`` and are answered in one place,
``handle``; the connection stays open.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
import trio

from aleatoria import messages as m
from aleatoria.auth import TokenRefused, token_expiry
from aleatoria.codec import decode, dumps, encode, now, parse_time_ns, payload_as
from aleatoria.config import Config
from aleatoria.errors import (
    INVALID_PAYLOAD,
    INVALID_TARGET,
    INVALID_TOKEN,
    LIMIT_REACHED,
    NOT_IN_ROOM,
    NOT_IN_ROOM_TEXT,
    PEER_UNAVAILABLE,
    TOO_LARGE,
    UNKNOWN_TYPE,
    ClientError,
    InvalidMessage,
)
from aleatoria.hub import Client
from aleatoria.limits import AbuseDetected, check_id, clamp_limit
from aleatoria.matchmaking import IMPOLITE, POLITE
from aleatoria.messages import Envelope
from aleatoria.router import Router, new_message_id
from aleatoria.store import Store
from aleatoria.websocket import POLICY_VIOLATION, text_frame

_HOUR = 3600.0

__all__ = ["Session", "new_message_id"]

log = logging.getLogger("aleatoria.session")


class Session:
    """Routes the messages of one connected client."""

    def __init__(self, client: Client, router: Router, store: Store, config: Config) -> None:
        self.client = client
        self.user = client.user
        self._router = router
        self._hub = router.hub
        self._store = store
        self._config = config
        self._stats = router.hub.stats

    # -- entry point ---------------------------------------------------------------------

    async def handle(self, frame: str | bytes | bytearray) -> None:
        """Act on one client frame. Never raises for anything the client sent."""
        stats = self._stats
        if self.client.replaced:
            return  # a successor owns the user's state now: this socket is closing (4001)
        try:
            self.client.limiter.check(trio.current_time())
            envelope = decode(frame)
            # Hostile clients choose ``type``: unknown ones share one label.
            stats.messages_in[envelope.type if envelope.type in m.CLIENT_TYPES else "unknown"] += 1
            await self._route(envelope)
        except ClientError as exc:
            stats.errors[exc.code] += 1
            self.reply_error(exc.code, exc.text)
        except InvalidMessage as exc:
            stats.messages_in["invalid"] += 1
            stats.errors["invalid_message"] += 1
            self._send(
                Envelope(
                    type=m.ERROR_RESPONSE,
                    from_user=m.SYSTEM,
                    to_user=self.user,
                    payload=m.ErrorResponse(error="Invalid message structure", details=exc.details),
                    message_id="err-" + new_message_id(),
                )
            )
        except AbuseDetected:
            log.info("event=rate_abuse user=%s action=close code=1008", self.user)
            self.client.ws.close(POLICY_VIOLATION, "rate limit exceeded")

    async def _route(self, env: Envelope) -> None:
        kind = env.type
        if env.message_id is not None and len(env.message_id) > self._config.max_message_id_chars:
            raise ClientError(TOO_LARGE, "messageId is longer than 128 characters")
        if kind == m.CHAT_MESSAGE:
            await self._chat(env)
        elif kind in m.SIGNALING_TYPES:
            await self._relay(env)
        elif kind == m.JOIN_ROOM:
            await self._join(env)
        elif kind == m.LEAVE_ROOM:
            await self._leave(env)
        elif kind == m.GET_ROOMS:
            rooms = await self._store.rooms()
            self.reply(m.ROOMS_LIST, m.RoomsList(rooms=rooms))
        elif kind == m.USER_AVAILABLE:
            ended = await self._store.set_available(self.user)
            self._peer_left(ended)
        elif kind == m.USER_UNAVAILABLE:
            await self._store.set_unavailable(self.user)
        elif kind == m.REQUEST_RANDOM_PEER:
            await self._request_peer(env)
        elif kind == m.GET_RECENT_MESSAGES:
            await self._recent(env)
        elif kind == m.GET_DIRECT_MESSAGES:
            await self._direct_history(env)
        elif kind == m.PING:
            self.reply(m.PONG, None)
        elif kind == m.REFRESH_TOKEN:
            self._refresh_token(env)
        else:
            raise ClientError(UNKNOWN_TYPE, f"Unknown message type: {kind[:64]!r}")

    # -- chat ----------------------------------------------------------------------------------

    async def _chat(self, env: Envelope) -> None:
        if (env.room is None) == (env.to_user is None):
            raise ClientError(INVALID_TARGET, "A chat message needs either room or toUser (not both).")
        config = self._config
        content = payload_as(env.payload, m.ChatPayload).content
        if len(content) > config.max_content_chars:
            raise ClientError(TOO_LARGE, f"content is longer than {config.max_content_chars} characters")
        room = to = None
        if env.room is not None:
            room = self._room_id(env.room)
            if room not in self.client.rooms:
                raise ClientError(NOT_IN_ROOM, NOT_IN_ROOM_TEXT)
        else:
            to = check_id("toUser", env.to_user or "", config.max_id_chars)
            self._count_conversation(to)
        created_ns, created = now()
        data = encode(
            Envelope(
                type=m.CHAT_MESSAGE,
                from_user=self.user,
                to_user=to,
                room=room,
                payload=env.payload,
                message_id=env.message_id or new_message_id(),
                create_time=created,
            )
        )
        # The whole message bounds its payload: encode the payload alone only when needed.
        if len(data) > config.max_payload_bytes and len(dumps(env.payload)) > config.max_payload_bytes:
            raise ClientError(TOO_LARGE, f"payload is larger than {config.max_payload_bytes} bytes")
        if room is not None:
            self._store.record_room_message(room, data, created_ns)
            await self._router.broadcast(room, data)
            return
        assert to is not None
        # The stored form has no ``incoming``; each side's copy adds its own. orjson always
        # ends an object with "}", so the flag is spliced in rather than encoded twice more.
        # The sender's copy is its acknowledgement: it leaves once the store has the message
        # (PROTOCOL.md section 16: what the sender saw acknowledged survives a crash).
        own = text_frame(data[:-1] + b',"incoming":false}')
        ws, stats = self.client.ws, self._stats

        def stored() -> None:
            ws.send(own)
            stats.messages_out[m.CHAT_MESSAGE] += 1

        self._store.record_direct_message(self.user, to, data, created_ns, stored)
        self._router.send(to, data[:-1] + b',"incoming":true}', m.CHAT_MESSAGE)

    def _count_conversation(self, to: str) -> None:
        """At most ``new_dm_per_hour`` new DM partners an hour (PROTOCOL.md section 16)."""
        partners = self.client.dm_partners
        if partners is None:
            partners = self.client.dm_partners = {}
        moment = trio.current_time()
        if to in partners and moment - partners[to] < _HOUR:
            return
        for partner in [p for p, first in partners.items() if moment - first >= _HOUR]:
            del partners[partner]
        limit = self._config.new_dm_per_hour
        if len(partners) >= limit:
            raise ClientError(
                LIMIT_REACHED, f"You can start at most {limit} new conversations an hour. Try again later."
            )
        partners[to] = moment

    # -- signaling -------------------------------------------------------------------------

    async def _relay(self, env: Envelope) -> None:
        if env.to_user is None:
            raise ClientError(INVALID_TARGET, f"{env.type} needs toUser.")
        to = check_id("toUser", env.to_user, self._config.max_id_chars)
        # A user in a live match hears call signaling from its match peer only (no hijack:
        # PROTOCOL.md section 16). The store knows the matches of this instance's users; the
        # route to another instance checks in Redis (``sender`` below).
        peer = self._store.match_peer(to)
        if peer is not None and peer != self.user:
            raise ClientError(PEER_UNAVAILABLE, f"User {to} is not online.")
        if env.type == m.HANGUP:
            await self._store.hangup(self.user, to)
        _, created = now()
        data = encode(
            Envelope(
                type=env.type,
                from_user=self.user,
                to_user=to,
                payload=env.payload,
                message_id=env.message_id or new_message_id(),
                create_time=created,
            )
        )
        # A hangup's header names the sender: the peer's instance ends the match it mirrors.
        extra = (self.user,) if env.type == m.HANGUP else ()
        if not await self._router.send_checked(to, data, env.type, *extra, sender=self.user):
            raise ClientError(PEER_UNAVAILABLE, f"User {to} is not online.")

    async def _request_peer(self, env: Envelope) -> None:
        request = payload_as(env.payload, m.PeerRequest, optional=True)
        current = request.current_peer_id
        if current is not None:
            check_id("currentPeerId", current, self._config.max_id_chars)
        outcome = await self._store.request_peer(self.user, current)
        self._peer_left(outcome.ended_peer)
        if outcome.peer is None:
            self.reply(m.NO_PEER_AVAILABLE, m.NoPeer(message=m.NO_PEER_TEXT))
            return
        self.reply(m.ASSIGN_ROLE, m.AssignRole(role=outcome.role, peer_id=outcome.peer))
        if not outcome.resend:
            self._stats.matches += 1
            role = _other_role(outcome.role)
            data = encode(
                Envelope(
                    type=m.ASSIGN_ROLE,
                    from_user=m.SYSTEM,
                    to_user=outcome.peer,
                    payload=m.AssignRole(role=role, peer_id=self.user),
                )
            )
            # The header carries peer and role: the peer's instance mirrors the match.
            self._router.send(outcome.peer, data, m.ASSIGN_ROLE, self.user, role)

    def _peer_left(self, peer: str | None) -> None:
        """Tell ``peer`` that this user left their match."""
        if peer is None:
            return
        self._router.peer_left(peer, self.user)

    # -- rooms -----------------------------------------------------------------------------

    def _room_id(self, room: str | None) -> str:
        if room is None:
            raise ClientError(INVALID_TARGET, "room is required.")
        return check_id("room", room, self._config.max_id_chars)

    async def _join(self, env: Envelope) -> None:
        room = self._room_id(env.room)
        limit = self._config.max_rooms_per_user
        if room not in self.client.rooms and len(self.client.rooms) >= limit:
            raise ClientError(LIMIT_REACHED, f"You are in {limit} rooms already. Leave one first.")
        await self.join(room)

    async def join(self, room: str) -> None:
        """Join ``room`` (idempotent) and confirm with ``room_joined`` once this instance
        receives the room's messages."""
        self._hub.join(self.client, room)
        await self._router.room_ready(room)
        live = self._hub.clients.get(self.user)
        if live is None or room not in live.rooms:
            return  # evicted while waiting (the user is another instance's now): no ghost
        await self._store.join_room(room, self.user)
        self.reply(m.ROOM_JOINED, m.RoomAction(room=room, action="joined"), room=room)

    async def adopt_rooms(self, rooms: tuple[str, ...]) -> None:
        """Rooms the user had on another instance (the store already knows them)."""
        for room in rooms:
            self._hub.join(self.client, room)
        for room in rooms:
            await self._router.room_ready(room)

    async def _leave(self, env: Envelope) -> None:
        room = self._room_id(env.room)
        self._hub.leave(self.client, room)
        await self._store.leave_room(room, self.user)
        self.reply(m.ROOM_LEFT, m.RoomAction(room=room, action="left"), room=room)

    # -- history -----------------------------------------------------------------------------

    async def _recent(self, env: Envelope) -> None:
        room = self._room_id(env.room)
        if room not in self.client.rooms:
            raise ClientError(NOT_IN_ROOM, NOT_IN_ROOM_TEXT)
        request = payload_as(env.payload, m.RecentMessagesRequest, optional=True)
        before = None if request.before is None else parse_time_ns(request.before)
        stored = await self._store.recent_room_messages(room, clamp_limit(request.limit), before)
        self.reply(
            m.RECENT_MESSAGES,
            m.RecentMessages(room=room, messages=[orjson.Fragment(s) for s in stored]),
            room=room,
        )

    async def _direct_history(self, env: Envelope) -> None:
        request = payload_as(env.payload, m.DirectMessagesRequest, optional=True)
        if request.with_user is None:
            raise ClientError(INVALID_PAYLOAD, "payload.withUser is required.")
        other = check_id("withUser", request.with_user, self._config.max_id_chars)
        stored = await self._store.direct_messages(self.user, other, clamp_limit(request.limit))
        self.reply(
            m.DIRECT_MESSAGES,
            m.DirectMessages(with_user=other, messages=[orjson.Fragment(s) for s in stored]),
        )

    # -- tokens --------------------------------------------------------------------------------

    def _refresh_token(self, env: Envelope) -> None:
        secret = self._config.auth_secret
        token = payload_as(env.payload, m.TokenRefresh).token
        if not secret:
            raise ClientError(INVALID_TOKEN, "This server does not use tokens.")
        try:
            exp = token_expiry(token, self.user, secret)
        except TokenRefused as exc:
            raise ClientError(INVALID_TOKEN, f"Token refused: {exc}.") from None
        self.client.expires_at = expires_at(exp)
        self.reply(m.TOKEN_REFRESHED, m.TokenRefreshed(exp=exp))

    # -- replies -----------------------------------------------------------------------------

    def reply(self, kind: str, payload: Any, *, room: str | None = None) -> None:
        self._send(Envelope(type=kind, from_user=m.SYSTEM, to_user=self.user, room=room, payload=payload))

    def reply_error(self, code: str, text: str) -> None:
        self.reply(m.ERROR, m.ErrorPayload(error=text, code=code))

    def _send(self, env: Envelope) -> None:
        self.client.ws.send(text_frame(encode(env)))
        self._stats.messages_out[env.type] += 1


def expires_at(exp: int) -> float:
    """A token's ``exp`` (unix seconds) on trio's clock."""
    return trio.current_time() + (exp - time.time())


def _other_role(role: str) -> str:
    return POLITE if role == IMPOLITE else IMPOLITE
