"""The codec's output is what history keeps (up to a day, 1,000 messages per room and per
DM conversation), so it must be right-sized."""

from __future__ import annotations

import json
import math
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aleatoria import messages as m
from aleatoria.codec import (
    converter,
    decode,
    dumps,
    encode,
    encode_relayed,
    encode_reply,
    loads,
    now,
    parse_time_ns,
    rfc3339,
)
from aleatoria.errors import InvalidMessage
from aleatoria.messages import Envelope


def test_encoded_messages_are_right_sized() -> None:
    envelope = Envelope(
        type=m.CHAT_MESSAGE,
        from_user="alice",
        to_user="bob",
        payload={"content": "x" * 150},
        message_id="m-1",
        create_time="2026-11-26T00:00:00.000000Z",
    )
    kept: list[bytes] = []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept.extend(encode(envelope) for _ in range(500))
        per_message = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    size = len(kept[0])
    # A bytes object costs its length plus ~33 bytes of header, and the list a pointer.
    # orjson 3.12+ alone retains a 4 KB buffer per result (4,098 bytes measured here).
    assert per_message < size + 100, (per_message, size)


# -- JSON stays JSON (PROTOCOL.md section 16) ------------------------------------------------

_LONG = "123456789012345678901234567890"


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"chat_message","payload":{"x":1e400}}',
        '{"type":"chat_message","payload":{"x":-1e400}}',
        # A 30-digit integer once sent the frame to the stdlib parser, which read 1e400 as inf.
        '{"type":"chat_message","payload":{"x":1e400,"y":' + _LONG + "}}",
        '{"type":"chat_message","payload":{"y":' + _LONG + "}}",
        '{"type":"chat_message","payload":{"y":18446744073709551616}}',
        '{"type":"chat_message","payload":{"y":-9223372036854775809}}',
        '{"type":"chat_message","payload":{"x":NaN,"y":' + _LONG + "}}",
        '{"type":"chat_message","payload":{"x":Infinity}}',
        '{"type":"chat_message","payload":{"x":-Infinity,"y":' + _LONG + "}}",
        '{"x":1' + "0" * 5000 + "}",
    ],
)
def test_non_finite_and_oversized_numbers_are_invalid(frame: str) -> None:
    with pytest.raises(InvalidMessage):
        loads(frame)


@pytest.mark.parametrize("number", [2**64 - 1, 2**63, -(2**63), 10**19, 0, -1])
def test_64_bit_integers_survive_exactly(number: int) -> None:
    frame = '{"y":' + str(number) + ',"z":' + _LONG[:19] + "}"
    assert {"y": number, "z": int(_LONG[:19])} == loads(frame)
    assert number == loads(dumps(loads(frame)))["y"]


@pytest.mark.parametrize(
    "text", ["-" * 40, "2026-12-03-" * 4, "12345678901234567890", "-1234567890123456789"]
)
def test_digit_and_dash_runs_in_strings_are_text(text: str) -> None:
    # Such runs send the frame to the exact parser (a minus counts as a digit there): it
    # reads them as the strings they are, and the numbers beside them exactly.
    frame = '{"type":"chat_message","payload":{"content":"' + text + '","n":-9223372036854775808}}'
    assert {"type": "chat_message", "payload": {"content": text, "n": -(2**63)}} == loads(frame)


# A 20-digit run (a 64-bit minimum) sends a frame to the standard library's parser.
_RUN = "-9223372036854775808"


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"x","payload":{"s":"\\ud800"}}',
        '{"type":"x","payload":{"s":"\\ud800","n":' + _RUN + "}}",
        '{"type":"x","payload":{"\\udfff":1,"n":' + _RUN + "}}",
        '{"type":"x","payload":[[[{"s":["ok","a\\udc00b"]}]]],"n":' + _RUN + "}",
        '{"type":"x","payload":{"s":"\\ude00\\ud83d","n":' + _RUN + "}}",  # a pair reversed
    ],
)
def test_lone_surrogates_are_invalid_on_both_parsers(frame: str) -> None:
    """No encoder can write a lone surrogate back: a frame with one is refused, whichever
    parser reads it (once, a search for such an interest failed to encode and ended the
    server)."""
    with pytest.raises(InvalidMessage):
        loads(frame)
    with pytest.raises(InvalidMessage):
        loads(frame.encode())


def test_raw_surrogate_bytes_are_invalid_on_both_parsers() -> None:
    for frame in (b'{"s":"\xed\xa0\x80"}', b'{"s":"\xed\xa0\x80","n":' + _RUN.encode() + b"}"):
        with pytest.raises(InvalidMessage):
            loads(frame)


def test_a_surrogate_pair_is_one_character_on_both_parsers() -> None:
    for tail in ("}", ',"n":' + _RUN + "}"):
        frame = '{"s":"\\ud83d\\ude00"' + tail
        assert "\U0001f600" == loads(frame)["s"]
        assert loads(frame) == loads(dumps(loads(frame)))


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


def _walk(value: object) -> list[object]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _walk(item)]
    if isinstance(value, list):
        return [leaf for item in value for leaf in _walk(item)]
    return [value]


@given(_json)
def test_whatever_is_accepted_is_written_back_as_strict_json(value: object) -> None:
    """Any text the stdlib can write (even with NaN, Infinity or huge integers) is either
    refused, or read into finite values that encode to strict JSON and read back equal."""
    try:
        parsed = loads(json.dumps(value))
    except InvalidMessage:
        leaves = _walk(value)
        assert any(
            (isinstance(x, float) and not math.isfinite(x))
            or (isinstance(x, int) and not isinstance(x, bool) and not -(2**63) <= x < 2**64)
            for x in leaves
        )
        return
    out = dumps(parsed)
    json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} written"))
    assert parsed == loads(out)


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@given(
    kind=st.sampled_from([m.CHAT_MESSAGE, *sorted(m.SIGNALING_TYPES)]),
    from_user=st.text(min_size=1),
    to_user=st.none() | st.text(),
    room=st.none() | st.text(),
    payload=_JSON,
    message_id=st.text(),
    create_time=st.text(),
)
def test_the_relay_fast_path_encodes_as_the_envelope_does(
    kind: str,
    from_user: str,
    to_user: str | None,
    room: str | None,
    payload: object,
    message_id: str,
    create_time: str,
) -> None:
    envelope = Envelope(
        type=kind,
        from_user=from_user,
        to_user=to_user,
        room=room,
        payload=payload,
        message_id=message_id,
        create_time=create_time,
    )
    assert encode_relayed(kind, from_user, to_user, room, payload, message_id, create_time) == encode(
        envelope
    )


_TEXT = st.text(max_size=8)
_REPLY_PAYLOADS = (
    st.none()
    | st.builds(
        m.AssignRole,
        role=st.sampled_from(["impolite", "polite"]),
        peer_id=_TEXT,
        match_id=st.none() | _TEXT,
        common_interests=st.none() | st.lists(_TEXT, max_size=3),
        ice_servers=st.none() | st.lists(st.dictionaries(_TEXT, _TEXT, max_size=2), max_size=2),
        ice_transport_policy=st.none() | st.sampled_from(["all", "relay"]),
    )
    | st.builds(m.RoomAction, room=_TEXT, action=st.sampled_from(["joined", "left"]))
    | st.builds(m.ErrorPayload, error=_TEXT, code=_TEXT)
    | st.builds(m.NoPeer, message=_TEXT)
    | st.builds(m.MemberEvent, room=_TEXT, user=_TEXT)
    | st.builds(m.RoomsList, rooms=st.lists(_TEXT, max_size=3))
    | st.dictionaries(_TEXT, _TEXT, max_size=2)
)


@given(kind=_TEXT, to_user=_TEXT, room=st.none() | _TEXT, payload=_REPLY_PAYLOADS)
def test_the_reply_fast_path_encodes_as_the_envelope_does(
    kind: str, to_user: str, room: str | None, payload: object
) -> None:
    envelope = Envelope(type=kind, from_user=m.SYSTEM, to_user=to_user, room=room, payload=payload)
    assert encode_reply(kind, to_user, payload, room) == encode(envelope)


_FIELDS = ("type", "fromUser", "toUser", "room", "payload", "messageId", "createTime", "incoming", "extra")


@given(
    st.dictionaries(
        st.sampled_from(_FIELDS),
        st.none()
        | st.booleans()
        | st.integers(-5, 5)
        | st.text(max_size=4)
        # Integers the JSON layer takes (beyond 64 bits ``loads`` refuses them first, and a
        # test of its own says so): what is compared here is the structuring.
        | st.lists(st.integers(-(2**63), 2**64 - 1), max_size=2),
    )
)
def test_decode_builds_what_cattrs_structures(fields: dict[str, object]) -> None:
    """The fast path of ``decode`` agrees with cattrs on every envelope: the same Envelope,
    or a refusal either way."""
    fields.setdefault("type", "ping")
    try:
        expected: object = converter.structure(fields, Envelope)
    except Exception:
        expected = InvalidMessage
    try:
        got: object = decode(json.dumps(fields))
    except InvalidMessage:
        got = InvalidMessage
    assert got == expected


def test_rfc3339_writes_what_now_writes() -> None:
    """The DM history script compares our createTime with a cutoff written by ``rfc3339``
    as text: both must be the same fixed-width form."""
    created_ns, created = now()
    assert created == rfc3339(created_ns)
    assert 27 == len(created)


@given(st.integers(0, 253_402_300_799 * 10**9))  # up to 9999-12-31T23:59:59Z
def test_rfc3339_is_fixed_width_and_orders_as_time_does(ns: int) -> None:
    text = rfc3339(ns)
    assert 27 == len(text)
    assert ns // 1000 * 1000 == parse_time_ns(text)
    later = rfc3339(ns + 1000)
    assert text < later
