"""The protocol core (pure, in the manner of h11): what each client request does.

How this works. ``handle(request, facts)`` decides; it performs no I/O and imports neither
trio nor redis nor sockets. It returns a ``Step``: frozen ``effects`` for the session to
apply now, and optionally one store ``call`` to await, whose outcome is handed to ``then``
for the next step. A request is done when a step has no call. So every rule of PROTOCOL.md
sections 3-5 and 16 is a plain function of its inputs, and a test drives it by choosing the
facts and the outcomes of the store calls::

    step = handle(JoinRoom("r"), facts)          # -> effects (JoinLocal), call RoomReady
    step = step.then(True)                       # -> call StoreJoin
    step = step.then(None)                       # -> effects (Reply room_joined), done

The session (``aleatoria.session``) is the shell: it parses frames into requests
(``aleatoria.requests``), gathers ``Facts``, applies effects (sockets, hub, router, store)
and performs calls. Client mistakes are raised as ``ClientError`` from here and answered by
the session in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from types import MappingProxyType
from typing import Any, NamedTuple, assert_never

import attrs
import orjson

from aleatoria import messages as m
from aleatoria.auth import TokenRefused, token_expiry
from aleatoria.codec import dumps, encode, encode_relayed, encode_reply
from aleatoria.errors import (
    INVALID_PAYLOAD,
    INVALID_TOKEN,
    LIMIT_REACHED,
    NOT_IN_ROOM,
    NOT_IN_ROOM_TEXT,
    PEER_UNAVAILABLE,
    RATE_LIMITED,
    TOO_LARGE,
    ClientError,
)
from aleatoria.ice import IcePolicy, ice_servers
from aleatoria.limits import TokenBucket
from aleatoria.matchmaking import IMPOLITE, POLITE, RequestOutcome
from aleatoria.messages import Envelope
from aleatoria.privacy import scrub_signal
from aleatoria.requests import (
    BlockUser,
    CancelSearch,
    ChatToRoom,
    ChatToUser,
    ClientMessage,
    GetBlocked,
    GetDirectMessages,
    GetIceServers,
    GetRecentMessages,
    GetRoomMembers,
    GetRooms,
    GetStats,
    JoinRoom,
    LeaveRoom,
    Limits,
    ListRooms,
    Ping,
    PoolThenRequest,
    RefreshToken,
    ReportUser,
    RequestRandomPeer,
    Signal,
    Typing,
    UnblockUser,
    UserAvailable,
    UserUnavailable,
)
from aleatoria.safety import (
    AUTO_SHADOW_SECONDS,
    EVIDENCE_BYTES,
    EVIDENCE_MESSAGES,
    EVIDENCE_ROOM_MESSAGES,
    EVIDENCE_ROOMS,
    NEW_DM_WINDOW,
)
from aleatoria.search import NO_PROFILE, Match, Profile, SearchOutcome

HOUR = NEW_DM_WINDOW  # new DM partners are counted per hour (the stores count over it too)
NO_TYPING: Mapping[str, float] = MappingProxyType({})  # until a session's first ``typing``


@attrs.frozen
class Rules:
    """The per-user limits and secrets the core applies (from ``Config``)."""

    max_rooms_per_user: int = 100
    new_dm_per_hour: int = 200
    # Reports a user may file in an hour from its first, across its connections (0: no limit).
    reports_per_hour: int = 30
    max_payload_bytes: int = 32_768
    auth_secret: str | None = None
    # A user reported by this many distinct users within an hour is shadow-banned for a day
    # (0: never).
    auto_shadow_reports: int = 0
    # Peer requests per second per user, and their burst (0: no limit; PROTOCOL.md s12).
    match_rate: float = 0.0
    match_burst: int = 30
    ice: IcePolicy = attrs.Factory(IcePolicy)
    # A history reply holds the messages that fit in this many bytes (the outbox's byte
    # bound): the frame being written is not counted by that bound, so an unread reply of 200
    # stored 32 KB messages held 6.5 MB per connection.
    history_reply_bytes: int = 1024 * 1024


@attrs.define
class Facts:
    """What the core needs to know besides the request, read-only to it but for one piece of
    state: ``match_budget``, the user's token bucket of peer requests, which the core makes
    on the first one and takes from. The clocks and ``new_id`` are called only by the rules
    that need them (most requests read no clock); ``match_peer`` reads the store's view of a
    user's live match (synchronous and cheap). The session keeps one per connection and
    refreshes ``dm_partners`` (not frozen: a request must not pay for building it)."""

    user: str
    rooms: frozenset[str] | set[str]
    # This hour's DM partners as the connection knows them (a cache of the store's count,
    # which is per user): partner -> when first written to (``monotonic``'s clock).
    dm_partners: Mapping[str, float]
    clock: Callable[[], tuple[int, str]]  # wall clock: (epoch ns, RFC 3339), for createTime
    monotonic: float  # trio's clock as the request arrived, for the per-hour windows
    new_id: Callable[[], str]  # a fresh messageId
    match_peer: Callable[[str], str | None]
    rules: Rules = Rules()
    # Safety (PROTOCOL.md section 13): the users who blocked this one (it may not write to
    # them), whether it is shadow-banned, and its budget of peer requests (None: none yet).
    blocked_by: frozenset[str] | set[str] = frozenset()
    shadow: bool = False
    match_budget: TokenBucket | None = None
    # The process's budgets of peer requests by user: a user's next connection goes on with
    # what is left of its budget (the skip limit is per user, not per connection).
    match_budgets: MutableMapping[str, TokenBucket] | None = None
    # ``typing`` (PROTOCOL.md section 11): target -> when this user last sent one there.
    typing_sent: Mapping[str, float] = NO_TYPING


# -- effects: what the session applies ---------------------------------------------------------


class Reply(NamedTuple):
    """A server message to the requester (``fromUser`` system)."""

    kind: str
    payload: Any
    room: str | None = None


class Deliver(NamedTuple):
    """A message (JSON) to ``user`` wherever it is connected; ``extra`` goes in the bus
    header (the peer's instance mirrors matches from it)."""

    user: str
    data: bytes
    kind: str
    extra: tuple[str, ...] = ()


class RecordDirect(NamedTuple):
    """Store a DM, then (once durable) send the sender ``own`` (PROTOCOL.md section 16)."""

    to: str
    data: bytes
    created_ns: int
    own: bytes


class PeerLeft(NamedTuple):
    """Tell ``peer`` this user left their match (``hangup {reason: peer_left}``)."""

    peer: str


class RememberPartner(NamedTuple):
    """``partner`` is one of this hour's, first written to at ``since`` (trio's clock): the
    connection's cache of partners, so a DM to it costs no store call until the hour passes."""

    partner: str
    since: float


class JoinLocal(NamedTuple):
    room: str


class LeaveLocal(NamedTuple):
    room: str


class SetExpiry(NamedTuple):
    """The connection's token now runs out at ``exp`` (unix seconds)."""

    exp: int


class CountMatch(NamedTuple):
    """A match was made; ``common``: how many interests the two share (for /metrics)."""

    common: int = 0


class NotifyBlock(NamedTuple):
    """Tell ``user``'s connection (wherever it is) that this user blocks it now, or no
    longer (``on``): it may not write to this user while blocked."""

    user: str
    on: bool


class TypingTo(NamedTuple):
    """Relay ``data`` (a ``typing`` frame) to the level-2 members of ``room`` but the
    sender, or to user ``user`` if it is level 2; remember ``key`` was sent to at
    ``moment`` (one a second per target)."""

    data: bytes
    key: str
    moment: float
    room: str | None = None
    user: str | None = None


class ReportFiled(NamedTuple):
    """A report was stored as ``report_id``: count it, hand it to the webhook."""

    report_id: str
    report: dict[str, Any]


Effect = (
    Reply
    | Deliver
    | RecordDirect
    | PeerLeft
    | RememberPartner
    | JoinLocal
    | LeaveLocal
    | SetExpiry
    | CountMatch
    | NotifyBlock
    | ReportFiled
    | TypingTo
)


# -- calls: what the session awaits, and the outcome each gives -----------------------------------


class Broadcast(NamedTuple):
    """Store ``data`` in ``room``'s history and deliver it to every member, everywhere
    (``created_ns`` is its ``createTime``; in Redis mode Redis may stamp a later one).
    Outcome: None."""

    room: str
    data: bytes
    created_ns: int


class RoomReady(NamedTuple):
    """Wait until this instance receives ``room``'s messages. Outcome: whether the room is
    still the user's here (False: the user moved to another instance meanwhile)."""

    room: str


class StoreJoin(NamedTuple):
    room: str


class StoreLeave(NamedTuple):
    room: str


class RoomDirectory(NamedTuple):
    """Outcome: (room, member count) pairs across instances, most members first."""

    limit: int
    prefix: str


class RoomMembers(NamedTuple):
    """Outcome: (exact member count, up to ``limit`` members sorted)."""

    room: str
    limit: int


class Counts(NamedTuple):
    """Outcome: the ``get_stats`` figures across instances (a ``store.Counts``)."""


class SetAvailable(NamedTuple):
    """Outcome: the peer whose match this ended, or None."""

    profile: Profile = NO_PROFILE


class SetUnavailable(NamedTuple):
    pass


class PoolThenRequestPeer(NamedTuple):
    """``SetAvailable`` (without a profile) then ``RequestPeer``, in one store step. Outcome:
    (the peer whose match pooling ended or None, a ``RequestOutcome``)."""

    current_peer: str | None
    profile: Profile = NO_PROFILE


class RequestPeer(NamedTuple):
    """Outcome: a ``RequestOutcome``."""

    current_peer: str | None
    profile: Profile = NO_PROFILE


class JoinSearch(NamedTuple):
    """Join the search queue (PROTOCOL.md section 12). Outcome: a ``SearchOutcome``; the
    matches it makes are announced by the search task (``aleatoria.searching``), after the
    ``searching`` reply."""

    current_peer: str | None
    profile: Profile


class LeaveSearch(NamedTuple):
    """Leave the search queue (``cancel_search``). Outcome: None."""


class Hangup(NamedTuple):
    peer: str


class Relay(NamedTuple):
    """Deliver to ``to`` if online (not to a user in someone else's call, on another
    instance). Outcome: whether it was delivered."""

    to: str
    data: bytes
    kind: str
    extra: tuple[str, ...] = ()


class RecentHistory(NamedTuple):
    """Outcome: stored messages (JSON bytes), newest first; with ``max_bytes``, those the
    reply's cut (``_within``, from the start) may keep, and may be one more (the store reads
    no more: ``Store.recent_room_messages``)."""

    room: str
    limit: int
    before_ns: int | None
    after_ns: int | None = None  # given: oldest first, strictly newer
    max_bytes: int | None = None


class DirectHistory(NamedTuple):
    """Outcome: stored messages (JSON bytes), oldest first; with ``max_bytes``, as
    ``RecentHistory``, cut from the end."""

    other: str
    limit: int
    max_bytes: int | None = None


class StoreBlock(NamedTuple):
    """Outcome: False when the requester has blocked the most users it may already."""

    user: str


class StoreUnblock(NamedTuple):
    user: str


class BlockedList(NamedTuple):
    """Outcome: the users the requester blocked, sorted."""


class RoomHistories(NamedTuple):
    """Outcome: the last ``limit`` messages (JSON bytes) of each of ``rooms``, together, each
    room's newest first and up to about ``max_bytes``, as ``RecentHistory`` reads: up to the
    first message that takes the ones before it over ``max_bytes`` (so at least one)."""

    rooms: tuple[str, ...]
    limit: int
    max_bytes: int


class MatchBetween(NamedTuple):
    """Outcome: the id of the requester's live match with ``other``, else of the most recent
    match between the two the store remembers (``Store.match_between``), or None."""

    other: str


class StoreReport(NamedTuple):
    """Outcome: (report id, distinct users who reported ``report['reported']`` within the
    hour). The session adds the instance."""

    report: dict[str, Any]


class CountPartner(NamedTuple):
    """Count ``partner`` among the requester's new DM partners of the hour, in the store (per
    user, across connections and instances), unless that would make more than ``limit``.
    Outcome: how long ago, in seconds, the requester first wrote to it within the hour (0.0:
    counted now), or None when refused (``Safety.new_dm_partner``)."""

    partner: str
    limit: int


class CountReport(NamedTuple):
    """Count a report filed by the requester in its window of an hour, in the store (per
    user, across connections and instances), unless ``limit`` are counted in it already.
    Outcome: True, or False when refused (``Safety.count_report``)."""

    limit: int


class ShadowBan(NamedTuple):
    """Shadow-ban ``user`` for ``seconds`` (automatic, after reports). Outcome: None."""

    user: str
    seconds: float
    reason: str


Call = (
    Broadcast
    | RoomReady
    | StoreJoin
    | StoreLeave
    | RoomDirectory
    | RoomMembers
    | Counts
    | SetAvailable
    | SetUnavailable
    | PoolThenRequestPeer
    | RequestPeer
    | JoinSearch
    | LeaveSearch
    | Hangup
    | Relay
    | RecentHistory
    | DirectHistory
    | StoreBlock
    | StoreUnblock
    | BlockedList
    | RoomHistories
    | MatchBetween
    | StoreReport
    | ShadowBan
    | CountPartner
    | CountReport
)


class Step(NamedTuple):
    """Apply ``effects``; then, if there is a ``call``, await it and continue with
    ``then(outcome)``."""

    effects: tuple[Effect, ...] = ()
    call: Call | None = None
    then: Callable[[Any], Step] | None = None


DONE = Step()


def _done(*effects: Effect) -> Step:
    return Step(effects)


def _after(call: Call, then: Callable[[Any], Step], *effects: Effect) -> Step:
    return Step(effects, call, then)


# -- the rules -----------------------------------------------------------------------------------


def handle(request: ClientMessage, facts: Facts) -> Step:
    """The first step of ``request``. Raises ClientError for a request that is refused."""
    match request:
        case ChatToRoom():
            return _chat_to_room(request, facts)
        case ChatToUser():
            return _chat_to_user(request, facts)
        case Signal():
            return _signal(request, facts)
        # Then the match's requests (a match is ~13 messages: these, then signals).
        case UserAvailable():
            return _after(SetAvailable(request.profile), _peer_left)
        case RequestRandomPeer():
            _skip_budget(facts)
            if request.wait:
                search = JoinSearch(request.current_peer_id, request.profile)
                return _after(search, lambda outcome: _searching(outcome, facts))
            call = RequestPeer(request.current_peer_id, request.profile)
            return _after(call, lambda outcome: _matched(outcome, facts))
        case PoolThenRequest():
            _skip_budget(facts)
            both = PoolThenRequestPeer(request.current_peer_id, request.profile)
            return _after(both, lambda pooled: _pooled_then_matched(pooled, facts))
        case UserUnavailable():
            return _after(SetUnavailable(), _nothing)
        case JoinRoom():
            return _join(request, facts)
        case LeaveRoom():
            return _leave(request)
        case GetRooms():  # the requester's rooms, as the original server answers
            return _done(Reply(m.ROOMS_LIST, m.RoomsList(rooms=sorted(facts.rooms))))
        case ListRooms():
            return _after(RoomDirectory(request.limit, request.prefix), _directory)
        case GetRoomMembers():
            return _members(request, facts)
        case GetStats():
            return _after(Counts(), _stats)
        case CancelSearch():  # no reply (PROTOCOL.md section 12 names none)
            return _after(LeaveSearch(), _nothing)
        case GetRecentMessages():
            return _recent(request, facts)
        case GetDirectMessages():
            return _after(
                DirectHistory(request.with_user, request.limit, _reply_room(facts)),
                lambda stored: _done(
                    Reply(
                        m.DIRECT_MESSAGES,
                        m.DirectMessages(
                            with_user=request.with_user,
                            messages=_within(stored, _reply_room(facts), from_start=False),
                        ),
                    )
                ),
            )
        case Ping():
            return _done(Reply(m.PONG, None))
        case RefreshToken():
            return _refresh(request, facts)
        case BlockUser():
            return _block(request.user, facts, _done(_blocked_reply(request.user)))
        case UnblockUser():
            other = request.user
            reply = _done(NotifyBlock(other, False), Reply(m.USER_UNBLOCKED, m.UserTarget(user=other)))
            return _after(StoreUnblock(other), lambda _: reply)
        case GetBlocked():
            return _after(
                BlockedList(), lambda users: _done(Reply(m.BLOCKED_USERS, m.BlockedUsers(users=users)))
            )
        case ReportUser():
            return _report(request, facts)
        case GetIceServers():
            return _done(Reply(m.ICE_SERVERS, _ice_servers(facts)))
        case Typing():
            return _typing(request, facts)
        case _:
            assert_never(request)


def _nothing(_: object) -> Step:
    return DONE


def _peer_left(ended: str | None) -> Step:
    return DONE if ended is None else _done(PeerLeft(ended))


# Room for the reply's envelope around its messages, within ``history_reply_bytes``.
_REPLY_ENVELOPE_BYTES = 4096


def _reply_room(facts: Facts) -> int:
    """The bytes a history reply's messages may take."""
    return facts.rules.history_reply_bytes - _REPLY_ENVELOPE_BYTES


def upto(stored: list[bytes], max_bytes: int) -> list[bytes]:
    """``stored`` up to the first message that takes the ones before it over ``max_bytes``,
    each counted as its length plus one, as a byte-bounded history read stops (a read may
    bring more: a Redis read merges in what the writer still holds)."""
    used = 0
    for kept, message in enumerate(stored, 1):
        used += len(message) + 1
        if used > max_bytes:
            return stored[:kept]
    return stored


def _fragments(stored: list[bytes]) -> list[Any]:
    return [orjson.Fragment(message) for message in stored]


def _within(stored: list[bytes], room: int, from_start: bool) -> list[Any]:
    """As many of ``stored`` as fit in ``room`` bytes, taken from its start (a room's history
    page: the nearest its ``before`` or ``after``, so the next page goes on from the last one
    kept) or from its end (the newest DMs, or evidence); at least one, so paging always moves
    on. Fragments, in ``stored``'s order. A history read is given the same ``room`` as
    ``max_bytes`` and counts the same way, so Redis sends no more than this keeps, plus one."""
    kept = 0
    for message in stored if from_start else reversed(stored):
        room -= len(message) + 1  # and its comma
        if room < 0 and kept:
            break
        kept += 1
    if kept < len(stored):
        stored = stored[:kept] if from_start else stored[len(stored) - kept :]
    return _fragments(stored)


# chat


def _chat_message(
    facts: Facts, payload: Any, message_id: str | None, room: str | None, to: str | None
) -> tuple[bytes, int]:
    created_ns, created = facts.clock()
    data = encode_relayed(
        m.CHAT_MESSAGE, facts.user, to, room, payload, message_id or facts.new_id(), created
    )
    # The whole message bounds its payload: encode the payload alone only when needed.
    limit = facts.rules.max_payload_bytes
    if len(data) > limit and len(dumps(payload)) > limit:
        raise ClientError(TOO_LARGE, f"payload is larger than {limit} bytes")
    return data, created_ns


def _chat_to_room(request: ChatToRoom, facts: Facts) -> Step:
    if request.room not in facts.rooms:
        raise ClientError(NOT_IN_ROOM, NOT_IN_ROOM_TEXT)
    data, created_ns = _chat_message(facts, request.payload, request.message_id, request.room, None)
    if facts.shadow:  # a shadow-banned user's room messages reach only itself, unstored
        return _done(Deliver(facts.user, data, m.CHAT_MESSAGE))
    return _after(Broadcast(request.room, data, created_ns), _nothing)


class DirectMessage(NamedTuple):
    """A DM's frames: ``stored`` (history, no ``incoming``), the sender's ``own`` copy and
    the recipient's ``incoming`` one; None for a shadow-banned sender, whose message is
    neither stored nor delivered (its own copy comes back as if it had been). ``to_count``: a
    partner the connection does not know as one of this hour's, which the store must count
    (``counted`` decides on its outcome) before the DM goes."""

    to: str
    to_count: CountPartner | None
    stored: bytes
    created_ns: int
    own: bytes
    incoming: bytes | None


def direct_message(request: ChatToUser, facts: Facts) -> DirectMessage:
    """The rules of a DM and its frames (``_chat_to_user`` makes them a step; the session
    applies them directly, asking the store first when ``to_count`` says so). Raises
    ClientError."""
    to = request.to_user
    if to in facts.blocked_by:
        raise ClientError(PEER_UNAVAILABLE, f"User {to} is not online.")
    count = new_partner(to, facts)
    data, created_ns = _chat_message(facts, request.payload, request.message_id, None, to)
    # The stored form has no ``incoming``; each side's copy adds its own. orjson always ends
    # an object with "}", so the flag is spliced in rather than encoded twice more.
    head = data[:-1]
    own = head + b',"incoming":false}'
    if facts.shadow:
        return DirectMessage(to, count, data, created_ns, own, None)
    return DirectMessage(to, count, data, created_ns, own, head + b',"incoming":true}')


_TEXT_OR_ABSENT = (str, type(None))
_FLAG_OR_ABSENT = (bool, type(None))


def _plain_envelope(data: dict[str, Any], limits: Limits) -> bool:
    """Whether the rest of a usual DM's or signal's envelope is as browsers send it: no
    ``room``, and ``messageId``, ``fromUser``, ``createTime`` and ``incoming`` absent or of
    their JSON type, ``messageId`` within its limit (what ``envelope_of`` and ``parse``
    would refuse is left to them)."""
    get = data.get
    message_id = get("messageId")
    return (
        "room" not in data
        and type(message_id) in _TEXT_OR_ABSENT
        and (message_id is None or len(message_id) <= limits.max_message_id_chars)
        and type(get("fromUser")) in _TEXT_OR_ABSENT
        and type(get("createTime")) in _TEXT_OR_ABSENT
        and type(get("incoming")) in _FLAG_OR_ABSENT
    )


def plain_dm(data: dict[str, Any], facts: Facts, limits: Limits) -> DirectMessage | None:
    """``direct_message`` of a parsed frame that is the usual DM, in one pass: a
    ``chat_message`` with ``toUser`` and a ``content`` payload, to one of this hour's
    partners the connection knows, every field of its type and within its limit. None for
    anything else, or anything to refuse: the caller then takes the general path
    (``envelope_of``, ``parse``, ``direct_message``), which decides it and says why. What this
    accepts, it answers as that path would, byte for byte (a property test holds them
    equal). Most frames of a chat are this one; skipping the general path's envelope,
    request and step saves 8 % of a DM round trip's server CPU (docs/performance.md, session
    19). Never raises."""
    get = data.get
    to, payload = get("toUser"), get("payload")
    if (
        get("type") != m.CHAT_MESSAGE
        or type(to) is not str
        or type(payload) is not dict
        or type(content := payload.get("content")) is not str
        or len(content) > limits.max_content_chars
        or not _plain_envelope(data, limits)
        or facts.shadow
        or to in facts.blocked_by
    ):
        return None
    # A partner of this hour passed ``check_id`` when it was counted: no id check again.
    since = facts.dm_partners.get(to)
    if since is None or facts.monotonic - since >= HOUR:
        return None
    created_ns, created = facts.clock()
    stored = encode_relayed(
        m.CHAT_MESSAGE, facts.user, to, None, payload, get("messageId") or facts.new_id(), created
    )
    if len(stored) > facts.rules.max_payload_bytes:
        return None  # the general path encodes the payload alone to decide
    head = stored[:-1]
    return DirectMessage(
        to, None, stored, created_ns, head + b',"incoming":false}', head + b',"incoming":true}'
    )


def _chat_to_user(request: ChatToUser, facts: Facts) -> Step:
    dm = direct_message(request, facts)
    effects: tuple[Effect, ...]
    if dm.incoming is None:  # shadow-banned: its own copy alone, as if delivered
        effects = (Deliver(facts.user, dm.own, m.CHAT_MESSAGE),)
    else:
        effects = (
            RecordDirect(dm.to, dm.stored, dm.created_ns, dm.own),
            Deliver(dm.to, dm.incoming, m.CHAT_MESSAGE),
        )
    count = dm.to_count
    if count is None:
        return Step(effects)
    moment = facts.monotonic
    return _after(count, lambda age: Step((counted(count, age, moment), *effects)))


def new_partner(to: str, facts: Facts) -> CountPartner | None:
    """At most ``new_dm_per_hour`` new DM partners an hour (PROTOCOL.md section 16), per
    user: None if the connection knows ``to`` as one of this hour's partners (no store call),
    else the store must count it. Raises ClientError when the connection alone knows of
    ``new_dm_per_hour`` partners within the hour (the store would refuse: no call needed)."""
    partners = facts.dm_partners
    moment = facts.monotonic
    since = partners.get(to)
    if since is not None and moment - since < HOUR:
        return None
    limit = facts.rules.new_dm_per_hour
    # The session prunes partners older than an hour when it adds one, so the count of
    # entries bounds this hour's: count exactly only when it could matter.
    if len(partners) >= limit and sum(1 for first in partners.values() if moment - first < HOUR) >= limit:
        raise _too_many_partners(limit)
    return CountPartner(to, limit)


def counted(count: CountPartner, age: float | None, moment: float) -> RememberPartner:
    """The store's answer to ``count`` (asked at ``moment``, trio's clock): the partner for
    the connection to remember, first written to ``age`` seconds before. Raises ClientError
    when the store refused it (nothing is stored or delivered then)."""
    if age is None:
        raise _too_many_partners(count.limit)
    return RememberPartner(count.partner, moment - age)


def _too_many_partners(limit: int) -> ClientError:
    text = f"You can start at most {limit} new conversations an hour. Try again later."
    return ClientError(LIMIT_REACHED, text)


# signaling and matches


def signal_frame(request: Signal, facts: Facts) -> bytes | None:
    """The frame a call signal relays to its target (the rules of who may signal whom), or
    None when it is dropped in silence. Raises ClientError."""
    to = request.to_user
    # A user in a live match hears call signaling from its match peer only (no hijack:
    # PROTOCOL.md section 16). The store knows the matches of this instance's users; the
    # route to another instance checks in Redis.
    peer = facts.match_peer(to)
    if (peer is not None and peer != facts.user) or to in facts.blocked_by:
        raise ClientError(PEER_UNAVAILABLE, f"User {to} is not online.")
    if facts.shadow and peer != facts.user:
        return None  # a shadow-banned user reaches its match peer alone; the rest is dropped
    payload = request.payload
    if facts.rules.ice.relay_only:
        # Privacy mode (PROTOCOL.md section 14): no address but a TURN server's reaches the
        # peer. A dropped candidate is not an error: the sender's client did nothing wrong.
        scrubbed = scrub_signal(request.kind, payload)
        if not scrubbed.keep:
            return None
        payload = scrubbed.payload
    message_id = request.message_id or facts.new_id()
    return encode_relayed(request.kind, facts.user, to, None, payload, message_id, facts.clock()[1])


# The call signals ``plain_signal`` takes (a hangup ends the match first: the general path).
PLAIN_SIGNALS = frozenset({m.WEBRTC_OFFER, m.WEBRTC_ANSWER, m.WEBRTC_CANDIDATE})


def plain_signal(data: dict[str, Any], facts: Facts, limits: Limits) -> bytes | None:
    """``signal_frame`` of a parsed frame that is the usual call signal, in one pass: an
    offer, answer or candidate to the user's match peer, whose match the store knows here,
    every envelope field of its type and within its limit, privacy mode off. None for
    anything else (and without a side effect but an id): the caller then takes the general
    path (``envelope_of``, ``parse``, ``signal_frame``), which decides it and says why. What
    this accepts, it answers as that path would, byte for byte (a property test holds them
    equal). Most frames of a call are these: the general path's envelope and request were
    7 % of the server's CPU under the reference generator's ``match`` (docs/performance.md,
    session 19). Never raises."""
    get = data.get
    kind, to = get("type"), get("toUser")
    if (
        type(kind) is not str  # a client's list or object is no set member
        or kind not in PLAIN_SIGNALS
        or type(to) is not str
        or not _plain_envelope(data, limits)
        or facts.rules.ice.relay_only
        or to in facts.blocked_by
        # The target's match is with this user: a valid id, and no hijack or shadow ban to
        # weigh (a shadow-banned user still reaches its match peer).
        or facts.match_peer(to) != facts.user
    ):
        return None
    message_id = get("messageId") or facts.new_id()
    return encode_relayed(kind, facts.user, to, None, get("payload"), message_id, facts.clock()[1])


def relay_signal(request: Signal, data: bytes, facts: Facts) -> Step:
    """Relay ``data``, ``request``'s frame (``signal_frame``); a hangup ends the match first."""
    to = request.to_user
    # A hangup's header names the sender: the peer's instance ends the match it mirrors.
    extra = (facts.user,) if request.kind == m.HANGUP else ()
    relay = _after(Relay(to, data, request.kind, extra), lambda reached: _delivered(reached, to))
    if request.kind == m.HANGUP:
        return _after(Hangup(to), lambda _: relay)
    return relay


def _signal(request: Signal, facts: Facts) -> Step:
    data = signal_frame(request, facts)
    return DONE if data is None else relay_signal(request, data, facts)


def _delivered(reached: bool, to: str) -> Step:
    if not reached:
        raise ClientError(PEER_UNAVAILABLE, f"User {to} is not online.")
    return DONE


def _skip_budget(facts: Facts) -> None:
    rules = facts.rules
    if rules.match_rate <= 0:
        return
    budget = facts.match_budget
    if budget is None:  # made on the first peer request: most connections never make one
        budgets = facts.match_budgets
        budget = None if budgets is None else budgets.get(facts.user)
        if budget is None:
            budget = TokenBucket(rules.match_rate, rules.match_burst)
            if budgets is not None:
                budgets[facts.user] = budget
        facts.match_budget = budget
    if not budget.take(facts.monotonic):
        raise ClientError(RATE_LIMITED, "Too many peer requests: slow down.")


def _pooled_then_matched(both: tuple[str | None, RequestOutcome], facts: Facts) -> Step:
    ended, outcome = both
    matched = _matched(outcome, facts)
    return matched if ended is None else Step((PeerLeft(ended), *matched.effects))


def _matched(outcome: RequestOutcome, facts: Facts) -> Step:
    effects: list[Effect] = []
    if outcome.ended_peer is not None:
        effects.append(PeerLeft(outcome.ended_peer))
    if outcome.peer is None:
        effects.append(Reply(m.NO_PEER_AVAILABLE, m.NoPeer(message=m.NO_PEER_TEXT)))
        return Step(tuple(effects))
    ice, common = facts.rules.ice, list(outcome.common)
    unix_now = _unix_now(facts) if ice.configured else 0  # for TURN credentials only
    mine = assign_role(outcome.role, outcome.peer, facts.user, ice, unix_now, outcome.match_id, common)
    effects.append(Reply(m.ASSIGN_ROLE, mine))
    if not outcome.resend:
        role = other_role(outcome.role)
        payload = assign_role(role, facts.user, outcome.peer, ice, unix_now, outcome.match_id, common)
        data = encode_reply(m.ASSIGN_ROLE, outcome.peer, payload)
        # The header carries peer and role: the peer's instance mirrors the match.
        effects += [CountMatch(len(common)), Deliver(outcome.peer, data, m.ASSIGN_ROLE, (facts.user, role))]
    return Step(tuple(effects))


def _searching(outcome: SearchOutcome, facts: Facts) -> Step:
    if outcome.resend is not None:
        return _matched(outcome.resend, facts)
    profile = outcome.profile
    searching = m.Searching(
        interests=list(profile.interests),
        position=outcome.position,
        online=outcome.online,
        language=profile.language,
    )
    reply = Reply(m.SEARCHING, searching)
    return _done(reply) if outcome.ended_peer is None else _done(PeerLeft(outcome.ended_peer), reply)


def match_frames(match: Match, ice: IcePolicy, unix_now: int) -> list[tuple[str, bytes, tuple[str, ...]]]:
    """The ``assign_role`` of each side of a match the search made: (user, JSON, bus header
    (peer, role, match id): the user's instance mirrors the match from it, and delivers an
    announcement that reaches it twice once)."""
    frames: list[tuple[str, bytes, tuple[str, ...]]] = []
    common = list(match.common)
    for user, peer, role in (
        (match.impolite, match.polite, IMPOLITE),
        (match.polite, match.impolite, POLITE),
    ):
        payload = assign_role(role, peer, user, ice, unix_now, match.match_id, common)
        data = encode_reply(m.ASSIGN_ROLE, user, payload)
        frames.append((user, data, (peer, role, match.match_id) if match.match_id else (peer, role)))
    return frames


def other_role(role: str) -> str:
    return POLITE if role == IMPOLITE else IMPOLITE


# ICE servers (PROTOCOL.md section 14)


def _unix_now(facts: Facts) -> int:
    return facts.clock()[0] // 1_000_000_000


def _ice_servers(facts: Facts) -> m.IceServers:
    ice = facts.rules.ice
    servers = ice_servers(ice, facts.user, _unix_now(facts))
    return m.IceServers(ice_servers=servers, ice_transport_policy=ice.transport_policy, ttl=ice.ttl)


def assign_role(
    role: str, peer: str, user: str, ice: IcePolicy, unix_now: int, match_id: str, common: list[str]
) -> m.AssignRole:
    """``assign_role`` for ``user``: the original's role and peer, the match's id and common
    interests (PROTOCOL.md section 12), and ICE servers with credentials of its own when the
    server has any."""
    if not ice.configured:
        return m.AssignRole(role=role, peer_id=peer, match_id=match_id or None, common_interests=common)
    return m.AssignRole(
        role=role,
        peer_id=peer,
        match_id=match_id or None,
        common_interests=common,
        ice_servers=ice_servers(ice, user, unix_now),
        ice_transport_policy=ice.transport_policy,
    )


# rooms and history


def _join(request: JoinRoom, facts: Facts) -> Step:
    room = request.room
    limit = facts.rules.max_rooms_per_user
    if room not in facts.rooms and len(facts.rooms) >= limit:
        raise ClientError(LIMIT_REACHED, f"You are in {limit} rooms already. Leave one first.")
    return join(room)


def join(room: str) -> Step:
    """Join ``room`` (idempotent) and confirm with ``room_joined`` once this instance
    receives the room's messages (also the URL's room at connect time)."""

    def stored(_: object) -> Step:
        return _done(joined(room))

    def ready(still_ours: bool) -> Step:
        # Evicted while waiting (the user is another instance's now): leave no ghost.
        return _after(StoreJoin(room), stored) if still_ours else DONE

    return _after(RoomReady(room), ready, JoinLocal(room))


def joined(room: str) -> Reply:
    """The confirmation of a join, once the store has it (``join``'s last effect)."""
    return Reply(m.ROOM_JOINED, m.RoomAction(room=room, action="joined"), room=room)


def _leave(request: LeaveRoom) -> Step:
    room = request.room
    reply = _done(Reply(m.ROOM_LEFT, m.RoomAction(room=room, action="left"), room=room))
    return _after(StoreLeave(room), lambda _: reply, LeaveLocal(room))


def _recent(request: GetRecentMessages, facts: Facts) -> Step:
    room = request.room
    if room not in facts.rooms:
        raise ClientError(NOT_IN_ROOM, NOT_IN_ROOM_TEXT)
    return _after(
        RecentHistory(room, request.limit, request.before_ns, request.after_ns, _reply_room(facts)),
        lambda stored: _done(
            Reply(
                m.RECENT_MESSAGES,
                m.RecentMessages(room=room, messages=_within(stored, _reply_room(facts), from_start=True)),
                room=room,
            )
        ),
    )


# typing (PROTOCOL.md section 11): never stored, one a second per sender and target

TYPING_INTERVAL = 1.0


def _typing(request: Typing, facts: Facts) -> Step:
    room, to = request.room, request.to_user
    if room is not None:
        if room not in facts.rooms:
            raise ClientError(NOT_IN_ROOM, NOT_IN_ROOM_TEXT)
        key = "#" + room  # ids have no "#": rooms and users never share a key
    else:
        assert to is not None  # parse: one of the two
        if to == facts.user or to in facts.blocked_by:
            return DONE
        key = to
    if facts.shadow:
        return DONE
    last = facts.typing_sent.get(key)
    if last is not None and facts.monotonic - last < TYPING_INTERVAL:
        return DONE  # over the limit: dropped silently
    data = encode(
        Envelope(
            type=m.TYPING, from_user=facts.user, to_user=to, room=room, payload=m.TypingPayload(request.state)
        )
    )
    return _done(TypingTo(data, key, facts.monotonic, room, to))


# the rooms directory (PROTOCOL.md section 11): answered to every client, so safe for level 1


def _directory(rooms: list[tuple[str, int]]) -> Step:
    entries = [m.DirectoryEntry(room=room, members=count) for room, count in rooms]
    return _done(Reply(m.ROOMS_DIRECTORY, m.RoomsDirectory(rooms=entries)))


def _members(request: GetRoomMembers, facts: Facts) -> Step:
    room = request.room
    if room not in facts.rooms:
        raise ClientError(NOT_IN_ROOM, NOT_IN_ROOM_TEXT)

    def listed(outcome: tuple[int, list[str]]) -> Step:
        count, members = outcome
        return _done(Reply(m.ROOM_MEMBERS, m.RoomMembers(room=room, count=count, members=members), room=room))

    return _after(RoomMembers(room, m.MAX_MEMBERS_LISTED), listed)


def _stats(counts: Any) -> Step:
    stats = m.Stats(
        online=counts.online, searching=counts.searching, in_calls=counts.in_calls, rooms=counts.rooms
    )
    return _done(Reply(m.STATS, stats))


# tokens


def _refresh(request: RefreshToken, facts: Facts) -> Step:
    secret = facts.rules.auth_secret
    if not secret:
        raise ClientError(INVALID_TOKEN, "This server does not use tokens.")
    try:
        exp = token_expiry(request.token, facts.user, secret)
    except TokenRefused as exc:
        raise ClientError(INVALID_TOKEN, f"Token refused: {exc}.") from None
    return _done(SetExpiry(exp), Reply(m.TOKEN_REFRESHED, m.TokenRefreshed(exp=exp)))


# safety (PROTOCOL.md section 13)


def _blocked_reply(other: str) -> Reply:
    return Reply(m.USER_BLOCKED, m.UserTarget(user=other))


def _block(other: str, facts: Facts, after: Step, *, required: bool = True) -> Step:
    """Block ``other``, end a live match between the two (``other`` hears ``peer_left``),
    then ``after``. ``required``: a full block list is an error (else the block is skipped:
    a report stands without it)."""
    if other == facts.user:
        raise ClientError(INVALID_PAYLOAD, "You cannot block yourself.")

    def stored(ok: bool) -> Step:
        if not ok:
            if required:
                raise ClientError(
                    LIMIT_REACHED, "You have blocked the most users you can. Unblock one first."
                )
            return after
        notify = NotifyBlock(other, True)

        def hung_up(ended: bool) -> Step:
            if ended:
                return Step((notify, PeerLeft(other), *after.effects), after.call, after.then)
            return Step((notify, *after.effects), after.call, after.then)

        # The store ends a live match between the two, also one ``facts`` does not show yet: a
        # match another instance made a moment before the block, whose ``assign_role`` is on
        # its way here (the router drops it: ``Client.blocking``). Asking only when
        # ``match_peer`` showed the match left such a pair matched, the other side never told.
        return _after(Hangup(other), hung_up)

    return _after(StoreBlock(other), stored)


TOO_MANY_REPORTS_TEXT = "You have filed too many reports in the last hour; try again later."


def _report(request: ReportUser, facts: Facts) -> Step:
    other = request.user
    if other == facts.user:
        raise ClientError(INVALID_PAYLOAD, "You cannot report yourself.")
    created = facts.clock()[1]
    current = facts.match_peer(facts.user) == other
    rooms = tuple(sorted(facts.rooms))[:EVIDENCE_ROOMS]

    def with_dms(dms: list[bytes]) -> Step:
        # The rooms are read up to what one history reply may hold (ALEATORIA_OUTBOX_BYTES)
        # in all, an even share each (at most one message more), newest first: 100 messages
        # of each of 20 rooms were up to 64 MB read and parsed for each report, and a client
        # may send 30 a second. A user's messages behind more than a share of newer ones in a
        # room are not found (with 20 rooms, 100 messages of 500 bytes fit in a share).
        share = facts.rules.history_reply_bytes // max(1, len(rooms))
        read = RoomHistories(rooms, EVIDENCE_ROOM_MESSAGES, share)
        return _after(read, lambda stored: with_rooms(dms, stored))

    def with_rooms(dms: list[bytes], stored: list[bytes]) -> Step:
        # The match: the one the client named, else the live one with the reported user, else
        # the most recent between them that the store remembers (PROTOCOL.md section 13).
        if request.match_id is not None:
            return with_match(dms, stored, request.match_id)
        return _after(MatchBetween(other), lambda match_id: with_match(dms, stored, match_id))

    def with_match(dms: list[bytes], stored: list[bytes], match_id: str | None) -> Step:
        report: dict[str, Any] = {
            "reporter": facts.user,
            "reported": other,
            "reason": request.reason,
            "details": request.details or "",
            "time": created,
            "match": {"matchId": match_id, "peer": other, "current": current},
            "evidence": {
                # The newest that fit in EVIDENCE_BYTES each: 20 messages of 32 KB made a
                # report of 1.3 MB, kept for good, and a reporter may file 25 a second.
                "directMessages": _within(dms[-EVIDENCE_MESSAGES:], EVIDENCE_BYTES, from_start=False),
                "roomMessages": _within(
                    messages_by(other, stored, EVIDENCE_MESSAGES), EVIDENCE_BYTES, from_start=False
                ),
            },
        }
        return _after(StoreReport(report), lambda outcome: filed(report, *outcome))

    def filed(report: dict[str, Any], report_id: str, reporters: int) -> Step:
        received = _done(
            ReportFiled(report_id, report), Reply(m.REPORT_RECEIVED, m.ReportReceived(report_id=report_id))
        )
        blocked = _block(other, facts, received, required=False)
        threshold = facts.rules.auto_shadow_reports
        if threshold and reporters >= threshold:
            reason = f"auto: reported by {reporters} users within an hour"
            return _after(ShadowBan(other, AUTO_SHADOW_SECONDS, reason), lambda _: blocked)
        return blocked

    gather = _after(DirectHistory(other, EVIDENCE_MESSAGES, EVIDENCE_BYTES), with_dms)
    # At most ``reports_per_hour`` a user, asked of the store first: a refused report costs
    # that one call and reads no evidence. Without the limit one client filled the report cap
    # (10,000, the oldest dropped) in 5.5 minutes at the rate limit, pushing out every other
    # report, each read costing up to 11 ms of server CPU (Redis mode).
    limit = facts.rules.reports_per_hour
    if not limit:
        return gather

    def counted_report(ok: bool) -> Step:
        if not ok:
            raise ClientError(LIMIT_REACHED, TOO_MANY_REPORTS_TEXT)
        return gather

    return _after(CountReport(limit), counted_report)


def messages_by(user: str, stored: list[bytes], limit: int) -> list[bytes]:
    """The newest ``limit`` of ``stored`` (message JSON) sent by ``user``, oldest first.

    Only a message holding ``user`` as a JSON string is parsed: a message by ``user`` holds
    ``"fromUser":"<user>"`` (ids need no escaping), and with whatever spaces another writer
    of the history put around the colon it still holds ``"<user>"``. The parse decides (a
    payload may hold that string, or that key)."""
    needle = orjson.dumps(user)
    found: list[tuple[str, bytes]] = []
    for data in stored:
        if needle not in data:
            continue
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(message, dict) and message.get("fromUser") == user:
            found.append((str(message.get("createTime") or ""), data))
    found.sort(key=lambda pair: pair[0])
    return [data for _, data in found[-limit:]]
