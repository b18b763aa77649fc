"""The protocol core, tested pure (no server, no socket, no trio): each rule of PROTOCOL.md
sections 3-5 and 16 as the core decides it, driving ``core.handle`` step by step with chosen
facts and store outcomes."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from aleatoria import core
from aleatoria import messages as m
from aleatoria.codec import decode, envelope_of, parse_time_ns
from aleatoria.core import Facts, Rules, Step
from aleatoria.errors import ClientError, InvalidMessage
from aleatoria.ice import IcePolicy
from aleatoria.limits import TokenBucket
from aleatoria.matchmaking import RequestOutcome
from aleatoria.requests import (
    ChatToRoom,
    ChatToUser,
    GetDirectMessages,
    GetRecentMessages,
    JoinRoom,
    Limits,
    RequestRandomPeer,
    Signal,
    parse,
)
from aleatoria.safety import EVIDENCE_BYTES, EVIDENCE_MESSAGES

CORE_MODULES = [
    "aleatoria.core",
    "aleatoria.requests",
    "aleatoria.codec",
    "aleatoria.messages",
    "aleatoria.errors",
    "aleatoria.limits",
    "aleatoria.matchmaking",
    "aleatoria.origin",
    "aleatoria.auth",
    "aleatoria.safety",
    "aleatoria.ice",
    "aleatoria.privacy",
]
PACKAGE = Path(__file__).resolve().parent.parent / "aleatoria"


def test_core_modules_import_no_io() -> None:
    """No core module imports trio, redis or a socket module itself, and importing them all
    in a fresh interpreter loads neither trio nor redis. (pyjwt, which the token rule uses,
    loads ``socket`` for its key-set client; the core never touches it.)"""
    for name in CORE_MODULES:
        tree = ast.parse((PACKAGE / (name.split(".")[1] + ".py")).read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for imported in names:
                top = imported.split(".")[0]
                assert top not in {"trio", "redis", "socket", "select", "selectors", "asyncio"}, (
                    name,
                    imported,
                )
    code = "import sys; " + "; ".join(f"import {name}" for name in CORE_MODULES)
    code += "; print(sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'redis')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "[]" == out.stdout.strip()


# -- helpers -------------------------------------------------------------------------------------

LIMITS = Limits()


def facts(
    user: str = "alice",
    rooms: set[str] | None = None,
    partners: dict[str, float] | None = None,
    matches: dict[str, str] | None = None,
    rules: Rules | None = None,
    monotonic: float = 1000.0,
    blocked_by: set[str] | None = None,
    shadow: bool = False,
    match_budget: TokenBucket | None = None,
) -> Facts:
    ids = iter(range(1, 1_000_000))
    known = matches or {}
    return Facts(
        user=user,
        rooms=rooms if rooms is not None else {"Lobby"},
        dm_partners=partners or {},
        clock=lambda: (1_764_000_000_000_000_000, "2025-11-24T16:00:00.000000Z"),
        monotonic=monotonic,
        new_id=lambda: f"id-{next(ids)}",
        match_peer=known.get,
        rules=rules or Rules(),
        blocked_by=blocked_by or set(),
        shadow=shadow,
        match_budget=match_budget,
    )


def request(message: dict[str, Any]) -> Any:
    return parse(decode(orjson.dumps(message)), LIMITS)


def run(step: Step, *outcomes: Any) -> list[Any]:
    """Every effect of ``step`` and its successors, feeding ``outcomes`` to the calls in
    order; also records the calls."""
    seen: list[Any] = []
    pending = list(outcomes)
    while True:
        seen.extend(step.effects)
        if step.call is None or step.then is None:
            return seen
        seen.append(step.call)
        step = step.then(pending.pop(0))


def refused(message: dict[str, Any], the_facts: Facts | None = None) -> str:
    with pytest.raises(ClientError) as caught:
        core.handle(request(message), the_facts or facts())
    return caught.value.code


def payload_of(data: bytes) -> Any:
    return orjson.loads(data)


# -- section 3: the envelope --------------------------------------------------------------------


def test_the_server_sets_from_user_and_create_time_and_keeps_a_message_id() -> None:
    message = {
        "type": "chat_message",
        "room": "Lobby",
        "fromUser": "mallory",
        "createTime": "1999-01-01T00:00:00Z",
        "messageId": "mine",
        "payload": {"content": "hi"},
    }
    effects = run(core.handle(request(message), facts()), None)
    record = next(e for e in effects if isinstance(e, core.Broadcast))
    sent = payload_of(record.data)
    assert ("alice", "2025-11-24T16:00:00.000000Z", "mine") == (
        sent["fromUser"],
        sent["createTime"],
        sent["messageId"],
    )
    del message["messageId"]
    effects = run(core.handle(request(message), facts()), None)
    assert payload_of(effects[0].data)["messageId"] == "id-1"


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (
            {"type": "chat_message", "room": "Lobby", "messageId": "x" * 129, "payload": {"content": "a"}},
            "too_large",
        ),
        ({"type": "chat_message", "payload": {"content": "a"}}, "invalid_target"),
        (
            {"type": "chat_message", "room": "Lobby", "toUser": "bob", "payload": {"content": "a"}},
            "invalid_target",
        ),
        ({"type": "chat_message", "room": "Lobby", "payload": {"content": 5}}, "invalid_payload"),
        ({"type": "chat_message", "room": "Lobby", "payload": {"content": "a" * 4001}}, "too_large"),
        ({"type": "chat_message", "room": "bad room", "payload": {"content": "a"}}, "invalid_payload"),
        ({"type": "chat_message", "room": "r" * 65, "payload": {"content": "a"}}, "too_large"),
        ({"type": "webrtc_offer", "payload": {}}, "invalid_target"),
        ({"type": "join_room"}, "invalid_target"),
        ({"type": "get_recent_messages", "room": "Lobby", "payload": {"limit": "5"}}, "invalid_payload"),
        (
            {"type": "get_recent_messages", "room": "Lobby", "payload": {"before": "yesterday"}},
            "invalid_payload",
        ),
        ({"type": "get_direct_messages", "payload": {}}, "invalid_payload"),
        ({"type": "request_random_peer", "payload": {"currentPeerId": "a b"}}, "invalid_payload"),
        ({"type": "no_such_type"}, "unknown_type"),
    ],
)
def test_bad_requests_are_refused_with_their_code(message: dict[str, Any], code: str) -> None:
    with pytest.raises(ClientError) as caught:
        parse(decode(orjson.dumps(message)), LIMITS)
    assert code == caught.value.code
    assert caught.value.close_code is None


def test_invalid_structure_is_a_kind_of_client_error() -> None:
    with pytest.raises(InvalidMessage) as caught:
        decode(b"[1]")
    assert isinstance(caught.value, ClientError)
    assert ("invalid_message", None) == (caught.value.code, caught.value.close_code)


@given(st.integers(-(10**6), 10**6))
def test_limit_is_clamped_to_1_200(limit: int) -> None:
    parsed = request({"type": "get_recent_messages", "room": "Lobby", "payload": {"limit": limit}})
    assert isinstance(parsed, GetRecentMessages)
    assert max(1, min(200, limit)) == parsed.limit
    assert 50 == request({"type": "get_direct_messages", "payload": {"withUser": "bob"}}).limit


# -- section 4: chat -------------------------------------------------------------------------------


def test_a_room_message_is_recorded_and_broadcast_to_members_only() -> None:
    step = core.handle(ChatToRoom("Lobby", {"content": "hi"}), facts())
    assert () == step.effects  # the broadcast stores what it delivers (Redis: with its time)
    assert isinstance(step.call, core.Broadcast) and "Lobby" == step.call.room
    assert parse_time_ns(payload_of(step.call.data)["createTime"]) == step.call.created_ns
    assert "not_in_room" == refused({"type": "chat_message", "room": "Other", "payload": {"content": "x"}})


def test_a_dm_goes_to_the_recipient_incoming_and_to_the_sender_once_stored() -> None:
    effects = run(core.handle(ChatToUser("bob", {"content": "hi"}), facts()), 0.0)
    count, remember, record, deliver = effects
    assert core.CountPartner("bob", 200) == count  # a new partner: the store counts it first
    assert core.RememberPartner("bob", 1000.0) == remember
    assert isinstance(record, core.RecordDirect) and isinstance(deliver, core.Deliver)
    assert "bob" == deliver.user
    assert payload_of(deliver.data)["incoming"] is True
    assert payload_of(record.own)["incoming"] is False
    assert "incoming" not in payload_of(record.data)  # the stored form has neither flag


def test_new_dm_partners_an_hour_are_limited() -> None:
    rules = Rules(new_dm_per_hour=2)
    full = facts(partners={"b1": 900.0, "b2": 950.0}, rules=rules, monotonic=1000.0)
    # The connection knows of two partners this hour: refused without asking the store.
    assert "limit_reached" == refused(
        {"type": "chat_message", "toUser": "b3", "payload": {"content": "x"}}, full
    )
    # A partner of this hour is not new (no store call); one from over an hour ago no longer
    # counts here, so the store is asked.
    assert 2 == len(run(core.handle(ChatToUser("b1", {"content": "x"}), full)))
    later = facts(partners={"b1": 900.0, "b2": 950.0}, rules=rules, monotonic=900.0 + core.HOUR)
    step = core.handle(ChatToUser("b3", {"content": "x"}), later)
    assert core.CountPartner("b3", 2) == step.call


def test_the_store_counts_new_dm_partners_per_user() -> None:
    """The connection's partners are a cache: a partner it does not know goes to the store,
    whose count is the user's (it survives reconnects); its refusal is limit_reached with
    nothing stored or delivered, its answer is remembered with the store's first time."""
    rules = Rules(new_dm_per_hour=3)
    fresh = facts(rules=rules, monotonic=5000.0)  # a new connection: it knows no partner
    step = core.handle(ChatToUser("b4", {"content": "x"}), fresh)
    assert core.CountPartner("b4", 3) == step.call and () == step.effects
    assert step.then is not None
    with pytest.raises(ClientError) as caught:
        step.then(None)
    assert "limit_reached" == caught.value.code
    # Counted by an earlier connection 600 s ago: remembered from then, and delivered.
    remember, record, deliver = step.then(600.0).effects
    assert core.RememberPartner("b4", 4400.0) == remember
    assert isinstance(record, core.RecordDirect) and isinstance(deliver, core.Deliver)
    # The pieces the session's fast path uses.
    dm = core.direct_message(ChatToUser("b4", {"content": "x"}), fresh)
    assert core.CountPartner("b4", 3) == dm.to_count
    assert core.RememberPartner("b4", 5000.0) == core.counted(core.CountPartner("b4", 3), 0.0, 5000.0)


# ``plain_dm``: the usual DM in one pass, equal to the general path wherever it answers.

_KNOWN = {"bob": 900.0, "stale": 1000.0 - core.HOUR}  # a partner of this hour, one from over it
_ABSENT = object()


def _general(data: dict[str, Any], the_facts: Facts, kind: type, rule: Callable[[Any, Facts], Any]) -> Any:
    """What the session's general path makes of a parsed frame: ``rule``'s answer (a DM's
    frames, a signal's frame or None) to a request of type ``kind``, or why it is not one."""
    try:
        parsed = parse(envelope_of(data), LIMITS)
        if type(parsed) is not kind:
            return type(parsed).__name__
        return rule(parsed, the_facts)
    except (ClientError, InvalidMessage) as exc:
        return str(exc)


def _general_dm(data: dict[str, Any], the_facts: Facts) -> Any:
    return _general(data, the_facts, ChatToUser, core.direct_message)


def _mostly(usual: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``usual`` five times in six: most frames drawn are DMs the fast path takes, each of the
    rest off in a field or two."""
    return st.integers(0, 5).flatmap(lambda k: usual if k else other)


_ANY_JSON = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5), st.just({}), st.just([]))


def _frames_of(
    kinds: st.SearchStrategy[Any], targets: st.SearchStrategy[Any], payloads: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    """Frames drawn field by field: ``type``, ``toUser`` and ``payload`` from the strategies
    given, the envelope's other fields mostly as browsers send them (absent, or of their
    type), each off now and then."""
    absent = st.just(_ABSENT)
    fields = {
        "type": kinds,
        "toUser": targets,
        "room": _mostly(absent, st.one_of(st.just("Lobby"), st.none())),
        "payload": payloads,
        "messageId": _mostly(absent | st.text(max_size=10), st.sampled_from(["", "m" * 129]) | _ANY_JSON),
        "fromUser": _mostly(absent | st.just("alice"), _ANY_JSON),
        "createTime": _mostly(absent | st.just("2025-01-01T00:00:00Z"), _ANY_JSON),
        "incoming": _mostly(absent | st.booleans(), _ANY_JSON),
    }
    return st.fixed_dictionaries(fields).map(
        lambda drawn: {key: value for key, value in drawn.items() if value is not _ABSENT}
    )


_DM_FRAMES = _frames_of(
    _mostly(st.just("chat_message"), st.sampled_from(["webrtc_offer", "join_room"]) | _ANY_JSON),
    _mostly(
        st.just("bob"),
        st.one_of(st.sampled_from(["stale", "dave", "", "b" * 65]), _ANY_JSON, st.just(_ABSENT)),
    ),
    _mostly(
        st.fixed_dictionaries(
            {"content": st.text(max_size=40)},
            optional={"ts": st.integers(0, 2**63), "extra": st.text(max_size=300)},
        ),
        st.one_of(
            st.fixed_dictionaries({"content": st.just("x" * 4001) | _ANY_JSON}), _ANY_JSON, st.just(_ABSENT)
        ),
    ),
)


@settings(max_examples=400)
@given(
    _DM_FRAMES,
    _mostly(st.just(False), st.just(True)),
    _mostly(st.just(set()), st.sets(st.sampled_from(["bob", "dave"]))),
    _mostly(st.just(32_768), st.just(300)),
)
def test_plain_dm_answers_as_the_general_path(
    data: dict[str, Any], shadow: bool, blocked_by: set[str], max_payload: int
) -> None:
    def the_facts() -> Facts:  # each path its own, with the same clock and ids
        return facts(
            partners=dict(_KNOWN),
            blocked_by=set(blocked_by),
            shadow=shadow,
            rules=Rules(max_payload_bytes=max_payload),
        )

    fast = core.plain_dm(data, the_facts(), LIMITS)
    if fast is not None:
        assert _general_dm(data, the_facts()) == fast
    event("taken" if fast is not None else "left to the general path")


def test_plain_dm_takes_the_usual_dms_and_leaves_the_rest() -> None:
    usual: list[dict[str, Any]] = [
        {"type": "chat_message", "toUser": "bob", "payload": {"content": "hi", "ts": 1}},  # the generator's
        {
            "type": "chat_message",
            "fromUser": "alice",
            "toUser": "bob",
            "payload": {"content": "hé"},
            "messageId": "m-1",
        },  # a browser's
    ]
    for data in usual:
        fast = core.plain_dm(data, facts(partners=dict(_KNOWN)), LIMITS)
        assert fast is not None and fast == _general_dm(data, facts(partners=dict(_KNOWN)))
    plain = usual[0]
    # Each of these the general path refuses or must count or decide otherwise: left to it.
    left: list[tuple[dict[str, Any], Facts]] = [
        (dict(plain, toUser="dave"), facts(partners=dict(_KNOWN))),  # a new partner: the store counts it
        (dict(plain, toUser="stale"), facts(partners=dict(_KNOWN))),  # over an hour ago: counted again
        (dict(plain, room="Lobby"), facts(partners=dict(_KNOWN))),  # both targets
        (dict(plain, payload={"content": 1}), facts(partners=dict(_KNOWN))),
        (dict(plain, payload={"content": "x" * 4001}), facts(partners=dict(_KNOWN))),
        (dict(plain, payload="hi"), facts(partners=dict(_KNOWN))),
        (dict(plain, messageId="m" * 129), facts(partners=dict(_KNOWN))),
        (dict(plain, messageId=7), facts(partners=dict(_KNOWN))),
        (dict(plain, fromUser=7), facts(partners=dict(_KNOWN))),
        (dict(plain, createTime=7), facts(partners=dict(_KNOWN))),
        (dict(plain, incoming="yes"), facts(partners=dict(_KNOWN))),
        (dict(plain, toUser=7), facts(partners=dict(_KNOWN))),
        (dict(plain, toUser=["bob"]), facts(partners=dict(_KNOWN))),  # no set lookup of a list
        (plain, facts(partners=dict(_KNOWN), blocked_by={"bob"})),
        (plain, facts(partners=dict(_KNOWN), shadow=True)),  # its own copy alone, unstored
        (
            dict(plain, payload={"content": "x" * 200}),
            facts(partners=dict(_KNOWN), rules=Rules(max_payload_bytes=200)),
        ),
    ]
    for data, the_facts in left:
        assert core.plain_dm(data, the_facts, LIMITS) is None, data


# ``plain_signal``: the usual call signal in one pass, equal to the general path where it answers.

_MATCHES = {"bob": "alice", "carol": "dave"}  # bob's match is with this user (alice); carol's is not


def _general_signal(data: dict[str, Any], the_facts: Facts) -> Any:
    return _general(data, the_facts, Signal, core.signal_frame)


_SIGNAL_FRAMES = _frames_of(
    _mostly(
        st.sampled_from(["webrtc_offer", "webrtc_answer", "webrtc_candidate"]),
        st.sampled_from(["hangup", "chat_message", "join_room"]) | _ANY_JSON,
    ),
    _mostly(
        st.just("bob"),
        st.one_of(st.sampled_from(["carol", "erin", "", "b" * 65]), _ANY_JSON, st.just(_ABSENT)),
    ),
    st.one_of(
        st.just(_ABSENT), _ANY_JSON, st.fixed_dictionaries({"sdp": st.text(max_size=20), "ts": st.integers()})
    ),
)


@settings(max_examples=400)
@given(
    _SIGNAL_FRAMES,
    _mostly(st.just(False), st.just(True)),
    _mostly(st.just(set()), st.sets(st.sampled_from(["bob", "carol"]))),
    _mostly(st.just(False), st.just(True)),
)
def test_plain_signal_answers_as_the_general_path(
    data: dict[str, Any], shadow: bool, blocked_by: set[str], relay_only: bool
) -> None:
    def the_facts() -> Facts:  # each path its own, with the same clock and ids
        return facts(
            matches=_MATCHES,
            blocked_by=set(blocked_by),
            shadow=shadow,
            rules=Rules(ice=IcePolicy(relay_only=relay_only)),
        )

    fast = core.plain_signal(data, the_facts(), LIMITS)
    if fast is not None:
        assert _general_signal(data, the_facts()) == fast
    event("taken" if fast is not None else "left to the general path")


def test_plain_signal_takes_a_calls_signals_and_leaves_the_rest() -> None:
    offer = {"type": "webrtc_offer", "toUser": "bob", "payload": {"type": "offer", "sdp": "v=0"}}
    for data in (
        offer,
        dict(offer, type="webrtc_answer", messageId="m-1", fromUser="alice"),
        dict(offer, type="webrtc_candidate", payload={"candidate": {"candidate": "candidate:0 1 udp"}}),
    ):
        fast = core.plain_signal(data, facts(matches=_MATCHES), LIMITS)
        assert fast is not None and fast == _general_signal(data, facts(matches=_MATCHES))
    left: list[tuple[dict[str, Any], Facts]] = [
        (dict(offer, type="hangup"), facts(matches=_MATCHES)),  # ends the match first
        (dict(offer, toUser="carol"), facts(matches=_MATCHES)),  # in a match with another: refused
        (dict(offer, toUser="erin"), facts(matches=_MATCHES)),  # no match here: maybe elsewhere
        (dict(offer, toUser=7), facts(matches=_MATCHES)),
        (dict(offer, toUser={"id": "bob"}), facts(matches=_MATCHES)),
        (dict(offer, room="Lobby"), facts(matches=_MATCHES)),
        (dict(offer, messageId="m" * 129), facts(matches=_MATCHES)),
        (dict(offer, messageId=7), facts(matches=_MATCHES)),
        (dict(offer, fromUser=7), facts(matches=_MATCHES)),
        (dict(offer, createTime=7), facts(matches=_MATCHES)),
        (dict(offer, incoming="yes"), facts(matches=_MATCHES)),
        (offer, facts(matches=_MATCHES, blocked_by={"bob"})),
        (offer, facts(matches=_MATCHES, rules=Rules(ice=IcePolicy(relay_only=True)))),  # scrubbed
    ]
    for data, the_facts in left:
        assert core.plain_signal(data, the_facts, LIMITS) is None, data


def test_payload_bytes_count_every_field() -> None:
    small = Rules(max_payload_bytes=2048)
    message = {"type": "chat_message", "room": "Lobby", "payload": {"content": "hi", "extra": "x" * 3000}}
    assert "too_large" == refused(message, facts(rules=small))
    message["payload"] = {"content": "é" * 500}  # 1,000 bytes of UTF-8
    assert run(core.handle(request(message), facts(rules=small)), None)


# -- section 4: rooms and history ----------------------------------------------------------------------


def test_join_is_local_first_then_ready_then_stored_then_confirmed() -> None:
    step = core.handle(JoinRoom("r"), facts())
    assert [core.JoinLocal("r")] == list(step.effects)
    assert core.RoomReady("r") == step.call
    assert step.then is not None
    stored = step.then(True)
    assert core.StoreJoin("r") == stored.call
    assert stored.then is not None
    done = stored.then(None)
    assert [core.Reply(m.ROOM_JOINED, m.RoomAction(room="r", action="joined"), room="r")] == list(
        done.effects
    )
    # Evicted while waiting: nothing stored, nothing confirmed.
    assert step.then(False) == core.DONE


def test_rooms_per_user_are_limited_but_rejoining_is_not() -> None:
    many = facts(rooms={"a", "b"}, rules=Rules(max_rooms_per_user=2))
    assert "limit_reached" == refused({"type": "join_room", "room": "c"}, many)
    assert core.RoomReady("a") == core.handle(JoinRoom("a"), many).call


def test_leave_is_idempotent_and_confirmed() -> None:
    effects = run(core.handle(request({"type": "leave_room", "room": "nowhere"}), facts()), None)
    assert core.LeaveLocal("nowhere") == effects[0]
    assert m.ROOM_LEFT == effects[-1].kind


def test_history_needs_membership_and_passes_limits() -> None:
    """The store is asked for ``limit`` messages and for the bytes the reply may hold (the
    rule that cuts it passes its budget down, so Redis reads no more)."""
    assert "not_in_room" == refused({"type": "get_recent_messages", "room": "Other"})
    rules = core.Rules(history_reply_bytes=100_000)
    step = core.handle(GetRecentMessages("Lobby", 7, None), facts(rules=rules))
    assert core.RecentHistory("Lobby", 7, None, None, 100_000 - core._REPLY_ENVELOPE_BYTES) == step.call
    effects = run(step, [b'{"a":1}'])
    assert b'{"a":1}' == orjson.dumps(effects[-1].payload.messages[0])
    step = core.handle(GetDirectMessages("bob", 3), facts(rules=rules))
    assert core.DirectHistory("bob", 3, 100_000 - core._REPLY_ENVELOPE_BYTES) == step.call


# -- section 4: matches and signaling ----------------------------------------------------------------------


def test_a_match_assigns_complementary_roles() -> None:
    effects = run(core.handle(RequestRandomPeer(), facts()), RequestOutcome(peer="bob", match_id="m1"))
    reply = next(e for e in effects if isinstance(e, core.Reply))
    deliver = next(e for e in effects if isinstance(e, core.Deliver))
    assert ("impolite", "bob", "m1") == (reply.payload.role, reply.payload.peer_id, reply.payload.match_id)
    sent = payload_of(deliver.data)["payload"]
    # The original's two fields, and section 12's matchId and commonInterests.
    assert {"role": "polite", "peerId": "alice", "matchId": "m1", "commonInterests": []} == sent
    assert ("alice", "polite") == deliver.extra
    assert any(isinstance(e, core.CountMatch) for e in effects)


def test_next_ends_the_old_match_and_a_crossed_request_resends() -> None:
    effects = run(
        core.handle(RequestRandomPeer("bob"), facts()), RequestOutcome(peer="carol", ended_peer="bob")
    )
    assert core.PeerLeft("bob") in effects
    resend = run(
        core.handle(RequestRandomPeer(), facts()), RequestOutcome(peer="bob", role="polite", resend=True)
    )
    assert not any(isinstance(e, (core.Deliver, core.CountMatch)) for e in resend)
    assert "polite" == resend[-1].payload.role
    none = run(core.handle(RequestRandomPeer(), facts()), RequestOutcome())
    assert m.NO_PEER_AVAILABLE == none[-1].kind


def test_signaling_is_relayed_unchanged_or_refused() -> None:
    payload = {"sdp": {"type": "offer", "sdp": "v=0\r\n"}, "n": [1, 2.5, None]}
    step = core.handle(Signal("webrtc_offer", "bob", payload), facts())
    assert isinstance(step.call, core.Relay)
    assert payload == payload_of(step.call.data)["payload"]
    with pytest.raises(ClientError) as caught:
        run(step, False)
    assert "peer_unavailable" == caught.value.code
    # A hangup ends the match in the store first.
    hangup = core.handle(Signal("hangup", "bob", {}), facts())
    assert core.Hangup("bob") == hangup.call


def test_signaling_into_someone_elses_call_is_refused() -> None:
    busy = facts(user="carol", matches={"alice": "bob", "bob": "alice"})
    for kind in ("webrtc_offer", "webrtc_answer", "webrtc_candidate", "hangup"):
        assert "peer_unavailable" == refused({"type": kind, "toUser": "alice", "payload": {}}, busy)
    mine = facts(user="bob", matches={"alice": "bob", "bob": "alice"})
    assert isinstance(core.handle(Signal("webrtc_offer", "alice", {}), mine).call, core.Relay)


def test_availability_ends_a_live_match() -> None:
    assert [core.SetAvailable(), core.PeerLeft("bob")] == run(
        core.handle(request({"type": "user_available_webrtc"}), facts()), "bob"
    )
    assert [core.SetAvailable()] == run(
        core.handle(request({"type": "user_available_webrtc"}), facts()), None
    )


def test_ping_and_tokens() -> None:
    assert [core.Reply(m.PONG, None)] == run(core.handle(request({"type": "ping"}), facts()))
    assert "invalid_token" == refused({"type": "refresh_token", "payload": {"token": "t"}})
    secret = "s" * 40
    token = jwt.encode({"sub": "alice", "exp": 4_000_000_000}, secret, algorithm="HS256")
    effects = run(
        core.handle(
            request({"type": "refresh_token", "payload": {"token": token}}),
            facts(rules=Rules(auth_secret=secret)),
        )
    )
    assert core.SetExpiry(4_000_000_000) == effects[0]
    other = jwt.encode({"sub": "bob", "exp": 4_000_000_000}, secret, algorithm="HS256")
    message = {"type": "refresh_token", "payload": {"token": other}}
    assert "invalid_token" == refused(message, facts(rules=Rules(auth_secret=secret)))


# -- the rooms directory (section 11, safe for level 1) ----------------------------------------------


def test_get_rooms_answers_the_requesters_rooms_sorted_without_a_store_call() -> None:
    step = core.handle(request({"type": "get_rooms"}), facts(rooms={"b", "Lobby", "a"}))
    assert step.call is None
    assert [core.Reply(m.ROOMS_LIST, m.RoomsList(rooms=["Lobby", "a", "b"]))] == list(step.effects)


def test_directory_requests() -> None:
    step = core.handle(request({"type": "list_rooms", "payload": {"limit": 500, "prefix": "Lo"}}), facts())
    assert core.RoomDirectory(200, "Lo") == step.call
    listed = run(step, [("Lobby", 3)])
    assert m.RoomsDirectory(rooms=[m.DirectoryEntry(room="Lobby", members=3)]) == listed[-1].payload
    assert "invalid_payload" == refused({"type": "list_rooms", "payload": {"prefix": "a:b"}})
    assert "not_in_room" == refused({"type": "get_room_members", "room": "Other"})
    members = run(
        core.handle(request({"type": "get_room_members", "room": "Lobby"}), facts()), (2, ["a", "b"])
    )
    assert m.RoomMembers(room="Lobby", count=2, members=["a", "b"]) == members[-1].payload
    assert core.Counts() == core.handle(request({"type": "get_stats"}), facts()).call


# -- section 13: safety --------------------------------------------------------------------------


def test_block_stores_then_tells_the_blocked_user() -> None:
    block = request({"type": "block_user", "payload": {"user": "bob"}})
    effects = run(core.handle(block, facts()), True, False)
    assert [
        core.StoreBlock("bob"),
        core.Hangup("bob"),  # no live match between them: nothing ended
        core.NotifyBlock("bob", True),
        core.Reply(m.USER_BLOCKED, m.UserTarget(user="bob")),
    ] == effects


def test_block_ends_a_match_the_facts_do_not_show_yet() -> None:
    """A match another instance made a moment before the block, its ``assign_role`` still on
    its way: the facts show no match, the store ends it, and the peer hears ``peer_left``."""
    block = request({"type": "block_user", "payload": {"user": "bob"}})
    effects = run(core.handle(block, facts()), True, True)
    assert [
        core.StoreBlock("bob"),
        core.Hangup("bob"),
        core.NotifyBlock("bob", True),
        core.PeerLeft("bob"),
        core.Reply(m.USER_BLOCKED, m.UserTarget(user="bob")),
    ] == effects


def test_block_ends_a_live_match_with_peer_left() -> None:
    matched = facts(matches={"alice": "bob", "bob": "alice"})
    effects = run(
        core.handle(request({"type": "block_user", "payload": {"user": "bob"}}), matched), True, True
    )
    assert [
        core.StoreBlock("bob"),
        core.Hangup("bob"),
        core.NotifyBlock("bob", True),
        core.PeerLeft("bob"),
        core.Reply(m.USER_BLOCKED, m.UserTarget(user="bob")),
    ] == effects


def test_block_refusals() -> None:
    assert "invalid_payload" == refused({"type": "block_user", "payload": {"user": "alice"}})
    step = core.handle(request({"type": "block_user", "payload": {"user": "bob"}}), facts())
    with pytest.raises(ClientError) as full:
        run(step, False)
    assert "limit_reached" == full.value.code


@pytest.mark.parametrize("kind", ["chat", *sorted(m.SIGNALING_TYPES)])
def test_the_blocked_may_not_write_to_the_blocker(kind: str) -> None:
    message: dict[str, Any] = {"type": kind, "toUser": "bob", "payload": {"content": "x"}}
    if kind == "chat":
        message["type"] = m.CHAT_MESSAGE
    assert "peer_unavailable" == refused(message, facts(blocked_by={"bob"}))
    # Anyone else is reachable.
    core.handle(request({**message, "toUser": "carol"}), facts(blocked_by={"bob"}))


def test_a_shadow_banned_user_reaches_only_itself() -> None:
    shadow = facts(shadow=True)
    room = run(
        core.handle(request({"type": "chat_message", "room": "Lobby", "payload": {"content": "x"}}), shadow)
    )
    assert [(core.Deliver, "alice")] == [(type(e), e.user) for e in room]
    dm = run(
        core.handle(request({"type": "chat_message", "toUser": "bob", "payload": {"content": "x"}}), shadow),
        0.0,  # counted like anyone's new partner: it sees its DM go as usual
    )
    delivered = [e for e in dm if isinstance(e, core.Deliver)]
    assert ["alice"] == [e.user for e in delivered]
    assert payload_of(delivered[0].data)["incoming"] is False
    assert not [e for e in dm if isinstance(e, core.RecordDirect | core.Broadcast)]
    # Signaling: to its match peer as usual, to anyone else dropped without a word.
    offer = {"type": "webrtc_offer", "toUser": "bob", "payload": {}}
    assert [] == run(core.handle(request(offer), shadow))
    paired = facts(shadow=True, matches={"alice": "bob", "bob": "alice"})
    assert [core.Relay] == [type(e) for e in run(core.handle(request(offer), paired), True)]


def test_report_gathers_evidence_stores_blocks_and_replies() -> None:
    def chat(sender: str, content: str, at: str) -> bytes:
        return orjson.dumps(
            {"type": "chat_message", "fromUser": sender, "createTime": at, "payload": {"content": content}}
        )

    dms = [chat("bob", "dm", "2025-01-01T00:00:00Z")]
    rooms = [
        chat("bob", "b2", "2025-01-01T00:00:02Z"),
        chat("carol", "c", "2025-01-01T00:00:01Z"),
        chat("bob", "b1", "2025-01-01T00:00:01Z"),
    ]
    message = {"type": "report_user", "payload": {"user": "bob", "reason": "spam", "details": "d"}}
    step = core.handle(request(message), facts(rooms={"Lobby", "Games"}))
    effects = run(step, True, dms, rooms, "m-1", ("7-0", 1), True, False)
    calls = [type(e) for e in effects if not isinstance(e, core.Reply | core.NotifyBlock | core.ReportFiled)]
    assert [
        core.CountReport,
        core.DirectHistory,
        core.RoomHistories,
        core.MatchBetween,
        core.StoreReport,
        core.StoreBlock,
        core.Hangup,
    ] == calls
    # The rooms are read up to what one history reply may hold, in all: an even share each.
    assert core.RoomHistories(("Games", "Lobby"), 100, core.Rules().history_reply_bytes // 2) in effects
    assert core.DirectHistory("bob", EVIDENCE_MESSAGES, EVIDENCE_BYTES) in effects
    assert core.MatchBetween("bob") in effects
    assert core.CountReport(30) == effects[0]  # ALEATORIA_REPORTS_PER_HOUR's default
    (filed,) = [e for e in effects if isinstance(e, core.ReportFiled)]
    report = orjson.loads(orjson.dumps(filed.report))
    assert ("7-0", "alice", "bob", "spam", "d") == (
        filed.report_id,
        report["reporter"],
        report["reported"],
        report["reason"],
        report["details"],
    )
    assert ["dm"] == [r["payload"]["content"] for r in report["evidence"]["directMessages"]]
    assert ["b1", "b2"] == [r["payload"]["content"] for r in report["evidence"]["roomMessages"]]
    assert {"matchId": "m-1", "peer": "bob", "current": False} == report["match"]
    assert core.Reply(m.REPORT_RECEIVED, m.ReportReceived(report_id="7-0")) == effects[-1]


def test_evidence_parses_only_messages_that_may_be_by_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """``messages_by`` keeps the user's newest messages, oldest first, and parses only those
    holding the user as a JSON string: not bob's name inside a longer one, nor "bobby"; a
    payload holding ``"fromUser":"bob"`` is parsed and dropped."""
    parsed: list[bytes] = []

    def chat(sender: str, content: Any, at: str) -> bytes:
        message = {"type": "chat_message", "fromUser": sender, "createTime": at, "payload": content}
        return orjson.dumps(message)

    stored = [
        chat("bob", {"content": "b2"}, "2025-01-01T00:00:02Z"),
        chat("bobby", {"content": "not bob"}, "2025-01-01T00:00:03Z"),
        chat("carol", {"content": "about bob, and bob's"}, "2025-01-01T00:00:04Z"),
        chat("carol", {"fromUser": "bob", "content": "forged"}, "2025-01-01T00:00:05Z"),
        b'{"type": "chat_message", "fromUser": "bob", "createTime": "2025-01-01T00:00:01Z"}',
    ]
    loads = orjson.loads

    def counting(data: bytes) -> Any:
        parsed.append(data)
        return loads(data)

    monkeypatch.setattr(orjson, "loads", counting)
    found = core.messages_by("bob", stored, 20)
    monkeypatch.undo()
    assert [stored[4], stored[0]] == found
    assert [stored[0], stored[3], stored[4]] == parsed


def test_upto_stops_after_the_first_message_over_the_budget() -> None:
    """``upto`` cuts as a byte-bounded history read stops: each message counts its length
    plus one, and the first past the budget is kept (at least one)."""
    stored = [b"a" * 9, b"b" * 9, b"c" * 9]
    assert stored[:1] == core.upto(stored, 0)
    assert stored[:2] == core.upto(stored, 10)
    assert stored[:3] == core.upto(stored, 20)
    assert stored == core.upto(stored, 30)


@pytest.mark.parametrize(
    ("given", "live", "known", "expected"),
    [
        ("m-given", True, "m-live", {"matchId": "m-given", "peer": "bob", "current": True}),
        (None, True, "m-live", {"matchId": "m-live", "peer": "bob", "current": True}),
        (None, False, "m-ended", {"matchId": "m-ended", "peer": "bob", "current": False}),
        (None, False, None, {"matchId": None, "peer": "bob", "current": False}),
    ],
)
def test_report_records_the_given_current_or_most_recent_match(
    given: str | None, live: bool, known: str | None, expected: dict[str, Any]
) -> None:
    """The match a report records: the ``matchId`` the client gave (the store is not asked),
    else what the store knows between the two (the live match, else the most recent one),
    else none (PROTOCOL.md section 13)."""
    payload: dict[str, Any] = {"user": "bob", "reason": "spam"}
    if given is not None:
        payload["matchId"] = given
    matches = {"alice": "bob", "bob": "alice"} if live else {}
    step = core.handle(request({"type": "report_user", "payload": payload}), facts(matches=matches))
    outcomes: list[Any] = [True, [], []] + ([] if given is not None else [known]) + [("1-0", 1), True]
    outcomes.append(live)  # the block's hangup: whether a live match ended
    effects = run(step, *outcomes)
    asked = [e for e in effects if isinstance(e, core.MatchBetween)]
    assert ([] if given is not None else [core.MatchBetween("bob")]) == asked
    (filed,) = [e for e in effects if isinstance(e, core.ReportFiled)]
    assert expected == filed.report["match"]


def test_a_report_over_the_hours_limit_is_refused_before_anything_is_read() -> None:
    """The store counts the report first (ALEATORIA_REPORTS_PER_HOUR, per user): when it
    refuses, the request is limit_reached and nothing else is asked (no evidence read, no
    report stored, no block); with the limit off (0) the store is not asked."""
    message = {"type": "report_user", "payload": {"user": "bob", "reason": "spam"}}
    step = core.handle(request(message), facts(rules=Rules(reports_per_hour=5)))
    assert (core.CountReport(5), ()) == (step.call, step.effects)
    assert step.then is not None
    with pytest.raises(ClientError) as refusal:
        step.then(False)
    assert ("limit_reached", core.TOO_MANY_REPORTS_TEXT) == (refusal.value.code, refusal.value.text)
    unlimited = core.handle(request(message), facts(rules=Rules(reports_per_hour=0)))
    assert core.DirectHistory("bob", EVIDENCE_MESSAGES, EVIDENCE_BYTES) == unlimited.call


def test_report_with_a_full_block_list_still_files() -> None:
    message = {"type": "report_user", "payload": {"user": "bob", "reason": "hate"}}
    effects = run(core.handle(request(message), facts()), True, [], [], None, ("1-0", 1), False)
    assert isinstance(effects[-1], core.Reply) and m.REPORT_RECEIVED == effects[-1].kind
    assert not [e for e in effects if isinstance(e, core.NotifyBlock)]


def test_enough_distinct_reporters_shadow_ban_for_a_day() -> None:
    message = {"type": "report_user", "payload": {"user": "bob", "reason": "spam"}}
    rules = Rules(auto_shadow_reports=3)
    below = run(
        core.handle(request(message), facts(rules=rules)),
        True,
        [],
        [],
        None,
        ("1-0", 2),
        True,
        False,
    )
    assert not [e for e in below if isinstance(e, core.ShadowBan)]
    at = run(
        core.handle(request(message), facts(rules=rules)),
        True,
        [],
        [],
        None,
        ("1-1", 3),
        None,
        True,
        False,
    )
    (ban,) = [e for e in at if isinstance(e, core.ShadowBan)]
    assert ("bob", 86400.0) == (ban.user, ban.seconds)


def test_skip_limit_refuses_peer_requests_over_the_rate() -> None:
    the_facts = facts(rules=Rules(match_rate=2.0, match_burst=2), monotonic=0.0)
    for _ in range(2):
        core.handle(request({"type": "request_random_peer"}), the_facts)
    assert "rate_limited" == refused({"type": "request_random_peer"}, the_facts)
    the_facts.monotonic = 0.5
    core.handle(request({"type": "request_random_peer"}), the_facts)
    # Off (0): never refused, and no bucket is made.
    unlimited = facts(monotonic=0.0)
    for _ in range(100):
        core.handle(request({"type": "request_random_peer"}), unlimited)
    assert unlimited.match_budget is None


# -- section 11 (level 2): typing; section 15: history forward ----------------------------------


def typing_facts(monotonic: float = 1000.0, **kw: Any) -> Facts:
    the_facts = facts(monotonic=monotonic, **kw)
    the_facts.typing_sent = {}
    return the_facts


def test_typing_is_relayed_never_stored_and_limited_per_target() -> None:
    """typing to a room or a user: one TypingTo effect (no history, no store call); a second
    one to the same target within a second is dropped; another target is not limited."""
    the_facts = typing_facts()
    step = core.handle(
        request({"type": "typing", "room": "Lobby", "payload": {"state": "started"}}), the_facts
    )
    assert step.call is None and 1 == len(step.effects)
    effect = step.effects[0]
    assert isinstance(effect, core.TypingTo) and "Lobby" == effect.room and effect.user is None
    assert {
        "type": "typing",
        "fromUser": "alice",
        "room": "Lobby",
        "payload": {"state": "started"},
    } == payload_of(effect.data)
    the_facts.typing_sent = {effect.key: effect.moment}
    again = core.handle(
        request({"type": "typing", "room": "Lobby", "payload": {"state": "stopped"}}), the_facts
    )
    assert () == again.effects
    other = core.handle(
        request({"type": "typing", "toUser": "bob", "payload": {"state": "started"}}), the_facts
    )
    sent = other.effects[0]
    assert isinstance(sent, core.TypingTo) and "bob" == sent.user
    the_facts.monotonic += core.TYPING_INTERVAL
    later = core.handle(
        request({"type": "typing", "room": "Lobby", "payload": {"state": "stopped"}}), the_facts
    )
    assert 1 == len(later.effects)


def test_typing_to_blockers_oneself_or_while_shadow_banned_is_dropped_silently() -> None:
    """No error (typing is never answered), nothing relayed."""
    message = {"type": "typing", "toUser": "bob", "payload": {"state": "started"}}
    assert () == core.handle(request(message), typing_facts(blocked_by={"bob"})).effects
    assert () == core.handle(request(message), typing_facts(shadow=True)).effects
    assert () == core.handle(request(message | {"toUser": "alice"}), typing_facts()).effects
    assert "not_in_room" == refused({"type": "typing", "room": "Other", "payload": {"state": "started"}})


def test_history_after_is_passed_to_the_store() -> None:
    """get_recent_messages with after: the store is asked for newer ones (oldest first)."""
    message = {
        "type": "get_recent_messages",
        "room": "Lobby",
        "payload": {"after": "2025-11-24T16:00:00.000001Z", "limit": 5},
    }
    step = core.handle(request(message), facts())
    room = core.Rules().history_reply_bytes - core._REPLY_ENVELOPE_BYTES
    assert core.RecentHistory("Lobby", 5, None, 1_764_000_000_000_001_000, room) == step.call
