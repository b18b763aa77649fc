"""Typed client messages (pure): one frozen class per client message type, and ``parse``,
which turns a decoded ``Envelope`` into one of them or raises ``ClientError``.

Everything a request needs from its envelope and payload is checked here, once, in the
order the protocol's error codes imply (PROTOCOL.md sections 3 and 4): a wrong target
(``invalid_target``), a payload of the wrong shape (``invalid_payload``), a value over a
limit (``too_large``), an id with forbidden characters. Rules that need facts beyond the
message (membership, matches, limits per user) are the core's (``aleatoria.core``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import attrs

from aleatoria import messages as m
from aleatoria.codec import parse_time_ns, payload_as
from aleatoria.errors import INVALID_PAYLOAD, INVALID_TARGET, TOO_LARGE, UNKNOWN_TYPE, ClientError
from aleatoria.limits import check_id, clamp_limit
from aleatoria.messages import Envelope
from aleatoria.safety import MAX_DETAILS_CHARS, report_problem
from aleatoria.search import NO_PROFILE, Profile, parse_profile


@attrs.frozen
class Limits:
    """The input limits a request is checked against (from ``Config``)."""

    max_id_chars: int = 64
    max_content_chars: int = 4000
    max_message_id_chars: int = 128


class ChatToRoom(NamedTuple):
    room: str
    payload: Any  # relayed and stored as the client sent it
    message_id: str | None = None


class ChatToUser(NamedTuple):
    to_user: str
    payload: Any
    message_id: str | None = None


class Signal(NamedTuple):
    """``webrtc_offer``, ``webrtc_answer``, ``webrtc_candidate`` or ``hangup``."""

    kind: str
    to_user: str
    payload: Any
    message_id: str | None = None


class JoinRoom(NamedTuple):
    room: str


class LeaveRoom(NamedTuple):
    room: str


class GetRooms(NamedTuple):
    pass


class UserAvailable(NamedTuple):
    profile: Profile = NO_PROFILE


class UserUnavailable(NamedTuple):
    pass


class RequestRandomPeer(NamedTuple):
    current_peer_id: str | None = None
    # PROTOCOL.md section 12: join the search queue, with this profile.
    wait: bool = False
    profile: Profile = NO_PROFILE


class CancelSearch(NamedTuple):
    pass


class PoolThenRequest(NamedTuple):
    """``user_available_webrtc`` (without a profile) and the immediate ``request_random_peer``
    right after it, as one step (never parsed from the wire: the session joins the two; see
    ``Session._join_held``). ``profile``: the request's."""

    current_peer_id: str | None = None
    profile: Profile = NO_PROFILE


class GetRecentMessages(NamedTuple):
    room: str
    limit: int
    before_ns: int | None = None
    after_ns: int | None = None  # given: strictly newer, oldest first (PROTOCOL.md section 15)


class GetDirectMessages(NamedTuple):
    with_user: str
    limit: int


class ListRooms(NamedTuple):
    """The rooms directory (PROTOCOL.md section 11)."""

    limit: int
    prefix: str = ""


class GetRoomMembers(NamedTuple):
    room: str


class GetStats(NamedTuple):
    pass


class Ping(NamedTuple):
    pass


class BlockUser(NamedTuple):
    user: str


class UnblockUser(NamedTuple):
    user: str


class GetBlocked(NamedTuple):
    pass


class ReportUser(NamedTuple):
    user: str
    reason: str
    details: str | None = None
    match_id: str | None = None


class GetIceServers(NamedTuple):
    pass


class RefreshToken(NamedTuple):
    token: str


class Typing(NamedTuple):
    """``typing`` (PROTOCOL.md section 11): to a room's level-2 members, or to one user."""

    state: str
    room: str | None = None
    to_user: str | None = None


TYPING_STATES = frozenset({"started", "stopped"})


ClientMessage = (
    ChatToRoom
    | ChatToUser
    | Signal
    | JoinRoom
    | LeaveRoom
    | GetRooms
    | UserAvailable
    | UserUnavailable
    | RequestRandomPeer
    | PoolThenRequest
    | GetRecentMessages
    | GetDirectMessages
    | ListRooms
    | GetRoomMembers
    | GetStats
    | Ping
    | RefreshToken
    | BlockUser
    | UnblockUser
    | GetBlocked
    | ReportUser
    | GetIceServers
    | Typing
    | CancelSearch
)

_GET_ROOMS = GetRooms()
_AVAILABLE = UserAvailable()
_UNAVAILABLE = UserUnavailable()
_PING = Ping()
_STATS = GetStats()
_GET_BLOCKED = GetBlocked()
_ICE = GetIceServers()
_CANCEL_SEARCH = CancelSearch()
_ANY_PEER = RequestRandomPeer(None, False)


def parse(env: Envelope, limits: Limits) -> ClientMessage:
    """The typed request an envelope carries. Raises ClientError (the reply says why)."""
    kind = env.type
    if env.message_id is not None and len(env.message_id) > limits.max_message_id_chars:
        raise ClientError(TOO_LARGE, f"messageId is longer than {limits.max_message_id_chars} characters")
    if kind == m.CHAT_MESSAGE:
        return _chat(env, limits)
    if kind in m.SIGNALING_TYPES:
        if env.to_user is None:
            raise ClientError(INVALID_TARGET, f"{kind} needs toUser.")
        to = check_id("toUser", env.to_user, limits.max_id_chars)
        return Signal(kind, to, env.payload, env.message_id)
    if kind == m.JOIN_ROOM:
        return JoinRoom(_room(env, limits))
    if kind == m.LEAVE_ROOM:
        return LeaveRoom(_room(env, limits))
    if kind == m.GET_ROOMS:
        return _GET_ROOMS
    if kind == m.USER_AVAILABLE:
        if type(env.payload) is not dict:
            return _AVAILABLE  # the original ignored this payload: so do we, unless a dict
        available = payload_as(env.payload, m.AvailableRequest)
        if available.interests is None and available.language is None:
            return _AVAILABLE
        return UserAvailable(parse_profile(available.interests, available.language, None))
    if kind == m.USER_UNAVAILABLE:
        return _UNAVAILABLE
    if kind == m.REQUEST_RANDOM_PEER:
        if not env.payload and (env.payload is None or type(env.payload) is dict):
            return _ANY_PEER  # the usual request, without structuring its empty payload
        request = payload_as(env.payload, m.PeerRequest, optional=True)
        current = request.current_peer_id
        if current is not None:
            check_id("currentPeerId", current, limits.max_id_chars)
        if request.wait is not None and not isinstance(request.wait, bool):
            raise ClientError(INVALID_PAYLOAD, "payload.wait must be a boolean.")
        if request.interests is None and request.language is None and request.interests_only is None:
            return RequestRandomPeer(current, bool(request.wait))
        profile = parse_profile(request.interests, request.language, request.interests_only)
        return RequestRandomPeer(current, bool(request.wait), profile)
    if kind == m.GET_RECENT_MESSAGES:
        room = _room(env, limits)
        recent = payload_as(env.payload, m.RecentMessagesRequest, optional=True)
        before = None if recent.before is None else parse_time_ns(recent.before)
        after = None if recent.after is None else parse_time_ns(recent.after)
        return GetRecentMessages(room, clamp_limit(recent.limit), before, after)
    if kind == m.GET_DIRECT_MESSAGES:
        direct = payload_as(env.payload, m.DirectMessagesRequest, optional=True)
        if direct.with_user is None:
            raise ClientError(INVALID_PAYLOAD, "payload.withUser is required.")
        other = check_id("withUser", direct.with_user, limits.max_id_chars)
        return GetDirectMessages(other, clamp_limit(direct.limit))
    if kind == m.LIST_ROOMS:
        directory = payload_as(env.payload, m.ListRoomsRequest, optional=True)
        prefix = directory.prefix or ""
        if prefix:  # the beginning of a room name: its characters and length
            check_id("prefix", prefix, limits.max_id_chars)
        return ListRooms(clamp_limit(directory.limit), prefix)
    if kind == m.GET_ROOM_MEMBERS:
        return GetRoomMembers(_room(env, limits))
    if kind == m.GET_STATS:
        return _STATS
    if kind == m.PING:
        return _PING
    if kind == m.GET_ICE_SERVERS:
        return _ICE
    if kind == m.CANCEL_SEARCH:
        return _CANCEL_SEARCH
    if kind == m.REFRESH_TOKEN:
        return RefreshToken(payload_as(env.payload, m.TokenRefresh).token)
    if kind == m.BLOCK_USER:
        return BlockUser(check_id("user", payload_as(env.payload, m.UserTarget).user, limits.max_id_chars))
    if kind == m.UNBLOCK_USER:
        return UnblockUser(check_id("user", payload_as(env.payload, m.UserTarget).user, limits.max_id_chars))
    if kind == m.GET_BLOCKED:
        return _GET_BLOCKED
    if kind == m.REPORT_USER:
        return _report(env, limits)
    if kind == m.TYPING:
        return _typing(env, limits)
    raise ClientError(UNKNOWN_TYPE, f"Unknown message type: {kind[:64]!r}")


def _report(env: Envelope, limits: Limits) -> ReportUser:
    report = payload_as(env.payload, m.ReportRequest)
    user = check_id("user", report.user, limits.max_id_chars)
    problem = report_problem(report.reason, report.details)
    if problem is not None:
        code = (
            TOO_LARGE
            if report.details is not None and len(report.details) > MAX_DETAILS_CHARS
            else INVALID_PAYLOAD
        )
        raise ClientError(code, f"payload.{problem}.")
    match_id = report.match_id
    if match_id is not None and len(match_id) > limits.max_message_id_chars:
        raise ClientError(TOO_LARGE, f"matchId is longer than {limits.max_message_id_chars} characters")
    return ReportUser(user, report.reason, report.details, match_id)


def _typing(env: Envelope, limits: Limits) -> Typing:
    if (env.room is None) == (env.to_user is None):
        raise ClientError(INVALID_TARGET, "typing needs either room or toUser (not both).")
    state = payload_as(env.payload, m.TypingPayload).state
    if state not in TYPING_STATES:
        raise ClientError(INVALID_PAYLOAD, 'payload.state must be "started" or "stopped".')
    if env.room is not None:
        return Typing(state, room=check_id("room", env.room, limits.max_id_chars))
    return Typing(state, to_user=check_id("toUser", env.to_user or "", limits.max_id_chars))


def _room(env: Envelope, limits: Limits) -> str:
    if env.room is None:
        raise ClientError(INVALID_TARGET, "room is required.")
    return check_id("room", env.room, limits.max_id_chars)


def _chat(env: Envelope, limits: Limits) -> ChatToRoom | ChatToUser:
    if (env.room is None) == (env.to_user is None):
        raise ClientError(INVALID_TARGET, "A chat message needs either room or toUser (not both).")
    payload = env.payload
    # The usual payload, checked without structuring it (~3 us a message); anything else is
    # structured for its exact error.
    if type(payload) is dict and type(content := payload.get("content")) is str:
        pass
    else:
        content = payload_as(payload, m.ChatPayload).content
    if len(content) > limits.max_content_chars:
        raise ClientError(TOO_LARGE, f"content is longer than {limits.max_content_chars} characters")
    if env.room is not None:
        return ChatToRoom(check_id("room", env.room, limits.max_id_chars), env.payload, env.message_id)
    return ChatToUser(check_id("toUser", env.to_user or "", limits.max_id_chars), env.payload, env.message_id)
