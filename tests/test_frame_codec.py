"""The frame codec (``aleatoria.frames``) alone: pure, no socket, no trio, no clock.

``FrameReader.parse`` must give the same messages, pongs and hand-over point however the
byte stream is cut into reads; unmask any key; take every length the fast path owns (up to
125 in the 7-bit field, 126..65535 in the 16-bit one) and leave the rest (64-bit lengths,
non-minimal lengths, long control frames, fragments, closes, unmasked frames, reserved
bits, bad UTF-8) to wsproto at the exact frame; and spend the frame budget on control frames
only. ``text_frame`` is checked against an independent decoder. tests/test_frames.py checks
the same reader inside a connection against wsproto itself.
"""

from __future__ import annotations

import subprocess
import sys

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from aleatoria.frames import POLICY_VIOLATION, FrameReader, Message, text_frame

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def client_frame(
    opcode: int,
    payload: bytes,
    key: bytes = b"\x37\xfa\x21\x3d",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    long16: bool = False,
) -> bytes:
    """One client frame, built here (not by the code under test). ``long16``: the length in
    the 16-bit field even when it would fit in 7 bits (RFC 6455 forbids that)."""
    size = len(payload)
    head = bytearray([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode])
    mask_bit = 0x80 if masked else 0
    if size < 126 and not long16:
        head.append(mask_bit | size)
    elif size < 65536:
        head += bytes([mask_bit | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + size.to_bytes(8, "big")
    if not masked:
        return bytes(head) + payload
    # XOR as one big-endian integer (the reader works little-endian, or with wsproto's masker).
    stream_key = (key * (size // 4 + 1))[:size]
    masked_payload = int.from_bytes(payload, "big") ^ int.from_bytes(stream_key, "big")
    return bytes(head) + key + masked_payload.to_bytes(size, "big")


def reader(
    *, max_message: int = 65536, rate: float = 0.0, burst: int = 400, partial: bytes = b""
) -> FrameReader:
    return FrameReader(
        max_message_bytes=max_message, frame_rate=rate, frame_burst=burst, now=0.0, partial=partial
    )


def parse_in_pieces(
    stream: bytes, cuts: list[int], *, burst: int = 400, rate: float = 0.0
) -> tuple[list[Message], list[bytes], bytes | int]:
    """Feed ``stream`` cut at ``cuts`` as a connection does: parse each read until the reader
    hands over (the bytes for wsproto, then every later read, are what wsproto gets) or
    fails. Returns the messages, the pongs, and what wsproto gets (or the failure code)."""
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    frames = reader(burst=burst, rate=rate)
    messages: list[Message] = []
    pongs: list[bytes] = []
    for i, piece in enumerate(pieces):
        rest = frames.parse(piece, 0.0, messages, pongs)
        if isinstance(rest, int):
            return messages, pongs, rest
        if rest:
            return messages, pongs, rest + b"".join(pieces[i + 1 :])
    return messages, pongs, b""


# -- any stream, cut anywhere ------------------------------------------------------------

_keys = st.binary(min_size=4, max_size=4)
_payloads = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=60).map(str.encode),
    st.sampled_from([b"", b"a" * 125, b"b" * 126, b"c" * 2048, b"d" * 2049, b"e" * 70_000]),
    st.sampled_from([b"\xff", b"\xed\xa0\x80", b"ok\xc3", "é€😀".encode()]),  # bad and good UTF-8
)


@st.composite
def any_frame(draw: st.DrawFn) -> bytes:
    """Mostly what the fast path takes, sometimes anything else a client could send."""
    opcode = draw(st.sampled_from([TEXT, TEXT, BINARY, BINARY, PING, PONG, CONT, CLOSE, 0x3, 0xB]))
    payload = draw(_payloads)
    if opcode in (PING, PONG, CLOSE) and draw(st.integers(0, 4)):
        payload = payload[:125]  # mostly legal control frames
    return client_frame(
        opcode,
        payload,
        draw(_keys),
        fin=draw(st.integers(0, 9)) != 0,
        rsv=draw(st.sampled_from([0, 0, 0, 0, 0, 0, 0, 1, 4])),
        masked=draw(st.integers(0, 19)) != 0,
        long16=len(payload) < 126 and draw(st.integers(0, 15)) == 0,
    )


_cuts = st.lists(st.integers(0, 200_000), max_size=12)


@settings(max_examples=1000, deadline=None)
@given(st.lists(any_frame(), min_size=1, max_size=10), _cuts)
def test_any_stream_cut_anywhere_parses_as_the_whole(frames: list[bytes], cuts: list[int]) -> None:
    """Same messages, same pongs, same bytes handed to wsproto, whatever the reads."""
    stream = b"".join(frames)
    assert parse_in_pieces(stream, []) == parse_in_pieces(stream, cuts)


@settings(max_examples=500, deadline=None)
@given(st.lists(any_frame(), min_size=1, max_size=12), _cuts, st.integers(1, 5))
def test_any_stream_cut_anywhere_spends_the_budget_at_the_same_frame(
    frames: list[bytes], cuts: list[int], burst: int
) -> None:
    """With a budget of a few frames (and no time passing), the failure comes at the same
    frame, after the same messages and pongs, whatever the reads."""
    stream = b"".join(frames)
    assert parse_in_pieces(stream, [], burst=burst, rate=1.0) == parse_in_pieces(
        stream, cuts, burst=burst, rate=1.0
    )


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([TEXT, BINARY]), st.binary(max_size=3000), _keys), max_size=12),
    _cuts,
)
def test_data_frames_give_their_payloads_in_order(
    frames: list[tuple[int, bytes, bytes]], cuts: list[int]
) -> None:
    """Masked whole data frames of any key and length under the limit: exactly their
    payloads (text ones valid UTF-8), nothing handed over, nothing left waiting."""
    frames = [
        (op, payload.decode("utf-8", "replace").encode() if op == TEXT else payload, key)
        for op, payload, key in frames
    ]
    stream = b"".join(client_frame(op, payload, key) for op, payload, key in frames)
    assert ([payload for _, payload, _ in frames], [], b"") == parse_in_pieces(stream, cuts)


# -- lengths ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 124, 125, 126, 127, 2047, 2048, 2049, 65534, 65535])
def test_every_length_the_fast_path_owns_is_taken(size: int) -> None:
    """7-bit lengths up to 125, 16-bit ones from 126 to 65535 (both masking routes: short
    payloads by integer XOR, long ones by wsproto's masker)."""
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    stream = client_frame(BINARY, payload, b"\x01\x80\xff\x7e")
    assert ([payload], [], b"") == parse_in_pieces(stream, [])
    assert ([payload], [], b"") == parse_in_pieces(stream, list(range(0, len(stream), 7)))


def test_lengths_beyond_the_fast_path_are_handed_over_at_their_frame() -> None:
    first = client_frame(TEXT, b"first")
    cases = {
        "64-bit length": client_frame(BINARY, b"x" * 65536),
        "non-minimal 16-bit length": client_frame(TEXT, b"short", long16=True),
        "over max_message": client_frame(BINARY, b"y" * 1001),
    }
    for name, tail in cases.items():
        frames = reader(max_message=1000)
        messages: list[Message] = []
        rest = frames.parse(first + tail + first, 0.0, messages, [])
        assert ([b"first"], tail + first) == (messages, rest), name


def test_max_message_is_inclusive() -> None:
    messages: list[Message] = []
    assert b"" == reader(max_message=1000).parse(client_frame(BINARY, b"z" * 1000), 0.0, messages, [])
    assert [b"z" * 1000] == messages


def test_an_incomplete_frame_waits_until_it_is_whole() -> None:
    """Every prefix of a frame (the 16-bit length itself cut in two included) waits in
    ``partial``; the last byte completes it."""
    stream = client_frame(TEXT, b"w" * 300)
    frames = reader()
    messages: list[Message] = []
    for byte in range(len(stream) - 1):
        assert b"" == frames.parse(stream[byte : byte + 1], 0.0, messages, [])
        assert [] == messages
    assert b"" == frames.parse(stream[-1:], 0.0, messages, [])
    assert ([b"w" * 300], b"") == (messages, frames.partial)


def test_handshake_bytes_are_parsed_first_and_take_partial_hands_them_over() -> None:
    frames = reader(partial=client_frame(TEXT, b"early") + b"\x81")
    messages: list[Message] = []
    assert b"" == frames.parse(b"", 0.0, messages, [])
    assert ([b"early"], b"\x81") == (messages, frames.partial)
    assert (b"\x81", b"") == (frames.take_partial(), frames.partial)


# -- what wsproto gets -------------------------------------------------------------------


@pytest.mark.parametrize(
    "unusual",
    [
        client_frame(TEXT, b"x", masked=False),  # 1002
        client_frame(TEXT, b"x", rsv=4),  # 1002
        client_frame(TEXT, b"fragment", fin=False),
        client_frame(CONT, b"more"),
        client_frame(CLOSE, (1000).to_bytes(2, "big")),
        client_frame(0x3, b"reserved opcode"),
        client_frame(PING, b"p" * 126),  # a long control frame: 1002
        client_frame(PING, b"p", fin=False),  # a fragmented control frame: 1002
        client_frame(TEXT, b"\xed\xa0\x80"),  # a UTF-16 surrogate: 1007
        client_frame(TEXT, b"ok\xc3"),  # truncated UTF-8: 1007
    ],
)
def test_unusual_frames_are_handed_over_with_everything_after_them(unusual: bytes) -> None:
    before, after = client_frame(BINARY, b"before"), client_frame(BINARY, b"after")
    messages: list[Message] = []
    pongs: list[bytes] = []
    rest = reader().parse(before + unusual + after, 0.0, messages, pongs)
    assert ([b"before"], [], unusual + after) == (messages, pongs, rest)


def test_invalid_utf8_in_a_binary_frame_is_just_bytes() -> None:
    messages: list[Message] = []
    assert b"" == reader().parse(client_frame(BINARY, b"\xff\xed\xa0\x80"), 0.0, messages, [])
    assert [b"\xff\xed\xa0\x80"] == messages


# -- control frames -----------------------------------------------------------------------


@given(st.binary(max_size=125), _keys)
def test_a_ping_is_answered_by_a_pong_with_its_payload(payload: bytes, key: bytes) -> None:
    pongs: list[bytes] = []
    messages: list[Message] = []
    assert b"" == reader().parse(client_frame(PING, payload, key), 0.0, messages, pongs)
    assert ([], [bytes([0x8A, len(payload)]) + payload]) == (messages, pongs)


def test_pongs_are_taken_silently_and_control_frames_keep_their_place() -> None:
    stream = (
        client_frame(PONG, b"heartbeat")
        + client_frame(PING, b"1")
        + client_frame(TEXT, b"between")
        + client_frame(PING, b"")
        + client_frame(PING, b"3")
    )
    messages: list[Message] = []
    pongs: list[bytes] = []
    assert b"" == reader().parse(stream, 0.0, messages, pongs)
    assert ([b"between"], [b"\x8a\x011", b"\x8a\x00", b"\x8a\x013"]) == (messages, pongs)


# -- the frame budget ---------------------------------------------------------------------


def test_control_frames_spend_the_budget_whole_data_frames_do_not() -> None:
    """A burst of 3: three control frames pass among any number of data frames; the fourth
    fails with 1008, and nothing after it is parsed."""
    frames = reader(rate=1.0, burst=3)
    data = client_frame(TEXT, b"d") * 20
    stream = data + client_frame(PING, b"a") + data + client_frame(PONG, b"") + client_frame(PING, b"b")
    stream += data + client_frame(PONG, b"over") + client_frame(TEXT, b"never")
    messages: list[Message] = []
    pongs: list[bytes] = []
    assert POLICY_VIOLATION == frames.parse(stream, 0.0, messages, pongs)
    assert ([b"d"] * 60, [b"\x8a\x01a", b"\x8a\x01b"]) == (messages, pongs)


def test_the_budget_refills_with_the_time_passed_in_up_to_the_burst() -> None:
    """(A connection fails at the first refusal, so refusals are only ever the last call.)"""
    frames = reader(rate=10.0, burst=2)
    assert [True, True] == [frames.take_frame(0.0) for _ in range(2)]
    assert frames.take_frame(0.1)  # 0.1 s at 10/s: one token
    assert not frames.take_frame(0.1)
    idle = reader(rate=10.0, burst=2)
    assert idle.take_frame(0.0)
    # An hour idle refills the burst, no more.
    assert [True, True, False] == [idle.take_frame(3600.0) for _ in range(3)]


def test_the_budget_is_shared_with_the_wsproto_path() -> None:
    """``take_frame`` (what the wsproto path spends) and ``parse`` draw on one bucket."""
    frames = reader(rate=1.0, burst=2)
    assert frames.take_frame(0.0)
    pongs: list[bytes] = []
    ping = client_frame(PING, b"")
    assert POLICY_VIOLATION == frames.parse(ping + ping, 0.0, [], pongs)
    assert [b"\x8a\x00"] == pongs


def test_rate_zero_turns_the_budget_off() -> None:
    frames = reader(rate=0.0, burst=1)
    pongs: list[bytes] = []
    assert b"" == frames.parse(client_frame(PING, b"") * 10_000, 0.0, [], pongs)
    assert 10_000 == len(pongs)


# -- text_frame ---------------------------------------------------------------------------


def _decode_server_frame(data: bytes) -> tuple[int, bytes, bytes]:
    """(first byte, payload, what follows) of one unmasked server frame."""
    size, head = data[1], 2
    assert not size & 0x80  # servers never mask
    if size == 126:
        size, head = int.from_bytes(data[2:4], "big"), 4
    elif size == 127:
        size, head = int.from_bytes(data[2:10], "big"), 10
    return data[0], data[head : head + size], data[head + size :]


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70_000])
def test_text_frame_uses_the_minimal_length_field(size: int) -> None:
    frame = text_frame(b"j" * size)
    assert (0x81, b"j" * size, b"") == _decode_server_frame(frame)
    assert len(frame) == size + (2 if size < 126 else 4 if size < 65536 else 10)


# -- purity -------------------------------------------------------------------------------


def test_the_codec_imports_no_trio_and_no_socket() -> None:
    """A real interpreter: importing the codec loads neither trio nor a socket module."""
    code = (
        "import sys, aleatoria.frames\n"
        "print(sorted(m for m in ('trio', 'socket', '_socket', 'ssl') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert "[]" == out.stdout.strip()
