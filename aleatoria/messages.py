"""Message models: the envelope and every payload, as frozen attrs classes.

Field names are snake_case here and camelCase on the wire (``codec`` maps them). A field
left at ``None`` is absent on the wire, never ``null``. Only ``None`` may be a default:
the codec omits every field equal to its default.
"""

from __future__ import annotations

from typing import Any

import attrs

SYSTEM = "system"

# Client -> server types.
CHAT_MESSAGE = "chat_message"
JOIN_ROOM = "join_room"
LEAVE_ROOM = "leave_room"
GET_ROOMS = "get_rooms"
USER_AVAILABLE = "user_available_webrtc"
USER_UNAVAILABLE = "user_unavailable_webrtc"
REQUEST_RANDOM_PEER = "request_random_peer"
WEBRTC_OFFER = "webrtc_offer"
WEBRTC_ANSWER = "webrtc_answer"
WEBRTC_CANDIDATE = "webrtc_candidate"
HANGUP = "hangup"
GET_RECENT_MESSAGES = "get_recent_messages"
GET_DIRECT_MESSAGES = "get_direct_messages"
PING = "ping"
REFRESH_TOKEN = "refresh_token"
# The rooms directory and figures (PROTOCOL.md section 11): requests any client may send.
LIST_ROOMS = "list_rooms"
GET_ROOM_MEMBERS = "get_room_members"
GET_STATS = "get_stats"
# Safety (PROTOCOL.md section 13).
BLOCK_USER = "block_user"
UNBLOCK_USER = "unblock_user"
GET_BLOCKED = "get_blocked"
REPORT_USER = "report_user"
GET_ICE_SERVERS = "get_ice_servers"  # PROTOCOL.md section 14
TYPING = "typing"  # PROTOCOL.md section 11: relayed to level-2 clients only
CANCEL_SEARCH = "cancel_search"  # PROTOCOL.md section 12

SIGNALING_TYPES = frozenset({WEBRTC_OFFER, WEBRTC_ANSWER, WEBRTC_CANDIDATE, HANGUP})
CLIENT_TYPES = SIGNALING_TYPES | {
    CHAT_MESSAGE,
    JOIN_ROOM,
    LEAVE_ROOM,
    GET_ROOMS,
    USER_AVAILABLE,
    USER_UNAVAILABLE,
    REQUEST_RANDOM_PEER,
    GET_RECENT_MESSAGES,
    GET_DIRECT_MESSAGES,
    PING,
    REFRESH_TOKEN,
    LIST_ROOMS,
    GET_ROOM_MEMBERS,
    GET_STATS,
    BLOCK_USER,
    UNBLOCK_USER,
    GET_BLOCKED,
    REPORT_USER,
    GET_ICE_SERVERS,
    TYPING,
    CANCEL_SEARCH,
}

# Server -> client types.
ROOM_JOINED = "room_joined"
ROOM_LEFT = "room_left"
ROOMS_LIST = "rooms_list"
ASSIGN_ROLE = "assign_role"
NO_PEER_AVAILABLE = "no_peer_available"
RECENT_MESSAGES = "recent_messages"
DIRECT_MESSAGES = "direct_messages"
ERROR = "error"
ERROR_RESPONSE = "error_response"
PONG = "pong"
TOKEN_REFRESHED = "token_refreshed"
ROOMS_DIRECTORY = "rooms_directory"
ROOM_MEMBERS = "room_members"
STATS = "stats"
USER_BLOCKED = "user_blocked"
USER_UNBLOCKED = "user_unblocked"
BLOCKED_USERS = "blocked_users"
REPORT_RECEIVED = "report_received"
ICE_SERVERS = "ice_servers"
# Level 2 only (PROTOCOL.md sections 11 and 15): never sent to a level-1 connection.
WELCOME = "welcome"
MEMBER_JOINED = "member_joined"
MEMBER_LEFT = "member_left"
SEARCHING = "searching"

NO_PEER_TEXT = "No peer available at the moment. Please try again later."
PEER_LEFT = "peer_left"
# ``room_members`` lists at most this many members; its ``count`` is exact (PROTOCOL.md s11).
MAX_MEMBERS_LISTED = 1000


@attrs.define
class Envelope:
    """Every frame, both directions (PROTOCOL.md section 3). Treated as immutable, but not
    ``frozen``: a frozen class sets each of its eight fields through ``object.__setattr__``,
    and an envelope is made for every frame in and most frames out."""

    type: str
    from_user: str | None = None
    to_user: str | None = None
    room: str | None = None
    payload: Any = None
    message_id: str | None = None
    create_time: str | None = None
    incoming: bool | None = None


# -- client payloads ---------------------------------------------------------------------


@attrs.frozen
class ChatPayload:
    content: str


@attrs.frozen
class PeerRequest:
    current_peer_id: str | None = None
    # PROTOCOL.md section 12; checked by ``search.parse_profile``.
    wait: Any = None
    interests: Any = None
    language: Any = None
    interests_only: Any = None


@attrs.frozen
class AvailableRequest:
    """``user_available_webrtc``'s optional payload (PROTOCOL.md section 12)."""

    interests: Any = None
    language: Any = None


@attrs.frozen
class RecentMessagesRequest:
    limit: int | None = None
    before: str | None = None
    after: str | None = None  # PROTOCOL.md section 15: newer ones, oldest first


@attrs.frozen
class TokenRefresh:
    token: str


@attrs.frozen
class DirectMessagesRequest:
    with_user: str | None = None
    limit: int | None = None


@attrs.frozen
class ListRoomsRequest:
    limit: int | None = None
    prefix: str | None = None


@attrs.frozen
class TypingPayload:
    state: str


@attrs.frozen
class UserTarget:
    """``block_user`` and ``unblock_user``; and their replies."""

    user: str


@attrs.frozen
class ReportRequest:
    user: str
    reason: str
    details: str | None = None
    match_id: str | None = None


# -- server payloads ---------------------------------------------------------------------


@attrs.frozen
class RoomAction:
    room: str
    action: str


@attrs.frozen
class RoomsList:
    rooms: list[str]


@attrs.frozen
class DirectoryEntry:
    room: str
    members: int


@attrs.frozen
class RoomsDirectory:
    rooms: list[DirectoryEntry]


@attrs.frozen
class RoomMembers:
    room: str
    count: int
    members: list[str]


@attrs.frozen
class Stats:
    """Figures across all instances: users connected, users pooled or searching for a call,
    users in a live match, rooms with members."""

    online: int
    searching: int
    in_calls: int
    rooms: int


@attrs.define  # not frozen, as Envelope: two are made per match
class AssignRole:
    role: str
    peer_id: str
    # PROTOCOL.md section 12: the match's id and the interests the two share.
    match_id: str | None = None
    common_interests: list[str] | None = None
    # PROTOCOL.md section 14: present when the server has ICE servers to hand out.
    ice_servers: list[Any] | None = None
    ice_transport_policy: str | None = None


@attrs.frozen
class IceServers:
    """``iceServers`` as ``RTCPeerConnection`` takes it, ``all`` or ``relay``, and how many
    seconds the TURN credentials in it stay valid."""

    ice_servers: list[Any]
    ice_transport_policy: str
    ttl: int


@attrs.frozen
class Searching:
    """The reply to a ``request_random_peer`` with ``wait: true`` (PROTOCOL.md section 12):
    the requester's normalised profile, its place in the queue (1 = next) and the users
    online."""

    interests: list[str]
    position: int
    online: int
    language: str | None = None


@attrs.frozen
class NoPeer:
    message: str


@attrs.frozen
class RecentMessages:
    room: str
    messages: list[Any]


@attrs.frozen
class DirectMessages:
    with_user: str
    messages: list[Any]


@attrs.frozen
class ErrorPayload:
    error: str
    code: str


@attrs.frozen
class ErrorResponse:
    error: str
    details: str


@attrs.frozen
class TokenRefreshed:
    exp: int


@attrs.frozen
class HangupNotice:
    reason: str


@attrs.frozen
class BlockedUsers:
    users: list[str]


@attrs.frozen
class ReportReceived:
    report_id: str


@attrs.frozen
class MemberEvent:
    """``member_joined`` / ``member_left`` (level 2)."""

    room: str
    user: str


@attrs.frozen
class Online:
    users: int
    searching: int


@attrs.frozen
class Welcome:
    """The first frame of a level-2 connection (PROTOCOL.md sections 11 and 15)."""

    session_id: str
    resume_token: str
    resume_window: float
    online: Online
    ice_servers: list[Any] | None = None
    ice_transport_policy: str | None = None
    resumed: bool | None = None
    missed: int | None = None
