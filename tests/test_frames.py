"""The inbound fast path (``aleatoria.frames.FrameReader``, as a connection drives it) against
wsproto alone.

The fast path unwraps common frames itself and hands everything else to wsproto. These
tests feed the same bytes, cut at arbitrary points, to a WebSocket using the fast path and to
one forced onto wsproto from the first byte, and require the same messages, the same close
code, the same failure and the same bytes sent back (pongs, the close frame) -- for valid
streams and for streams with every kind of fault, and with a frame budget (PROTOCOL.md
section 16) small enough to run out. (The tests are async only because a WebSocket reads
trio's clock; no time passes for the budget between the feeds of one test, as the budget's
clock is the time of the last ``recv``, which these tests never make.)
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings
from rawws import BINARY, CLOSE, CONT, PING, PONG, TEXT, frame

from aleatoria.connection import WebSocket
from aleatoria.flusher import Flusher
from aleatoria.frames import Message

MAX_MESSAGE = 3000


@contextmanager
def _websocket(*, fast: bool, frame_burst: int = 400) -> Iterator[tuple[WebSocket, socket.socket]]:
    """A WebSocket on the fast path or on wsproto from the start, and its peer's socket."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    try:
        ws = WebSocket(
            ours,
            b"",
            max_message_bytes=MAX_MESSAGE,
            outbox_frames=10_000,
            close_timeout=1.0,
            flusher=Flusher(),  # never run: these tests only parse (``_run`` flushes)
            frame_rate=1.0,
            frame_burst=frame_burst,
        )
        ws._fast = fast
        yield ws, theirs
    finally:
        ours.close()
        theirs.close()


def _sent(ws: WebSocket, peer: socket.socket) -> list[tuple[int, bytes]]:
    """The frames ``ws`` wrote to ``peer`` (once it wrote what waits for the flusher), as
    (opcode, payload); a close frame's payload cut to its code (the reason of a UTF-8 error
    names a position, which differs where wsproto decodes a frame in pieces)."""
    ws.flush()
    data = b""
    while True:
        try:
            data += peer.recv(65536)
        except BlockingIOError:
            break
    frames = []
    while data:
        size, head = data[1], 2  # server frames are unmasked
        if size == 126:
            size, head = int.from_bytes(data[2:4], "big"), 4
        opcode, payload = data[0] & 0x0F, data[head : head + size]
        frames.append((opcode, payload[:2] if opcode == CLOSE else payload))
        data = data[head + size :]
    return frames


def _run(
    pair: tuple[WebSocket, socket.socket], chunks: list[bytes]
) -> tuple[list[bytes], int | None, bool, list[tuple[int, bytes]]]:
    """Feed ``chunks`` as ``_receive_loop`` does; the messages as bytes, the close code,
    whether the connection failed, and the bytes it sent back."""
    ws, peer = pair
    messages: list[Message] = []
    pongs: list[bytes] = []
    open_ = True
    for chunk in chunks:
        ws._feed(chunk, messages, pongs)
        while open_ and not ws._fast and not ws._failed:
            open_ = ws._collect(messages)
            if not ws._unparsed:
                break
        if not open_ or ws._failed:
            break
    as_bytes = [m.encode() if isinstance(m, str) else bytes(m) for m in messages]
    return as_bytes, ws.close_code, ws._failed, _sent(ws, peer)


def _both(stream: bytes, cuts: list[int], frame_burst: int = 400) -> None:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    chunks = [c for c in chunks if c] or [b""]
    with (
        _websocket(fast=True, frame_burst=frame_burst) as fast,
        _websocket(fast=False, frame_burst=frame_burst) as reference,
    ):
        assert _run(fast, chunks) == _run(reference, chunks)


_payloads = st.one_of(
    st.text(max_size=40).map(str.encode),
    st.binary(max_size=40),
    st.sampled_from([b"", b"x" * 125, b"x" * 126, b"y" * 1025, b"z" * (MAX_MESSAGE + 1)]),
    st.sampled_from([b"\xff", b"\xed\xa0\x80", b"ok\xc3", "é".encode()]),  # bad and good UTF-8
)


@st.composite
def _frames(draw: st.DrawFn) -> bytes:
    opcode = draw(st.sampled_from([TEXT, TEXT, TEXT, BINARY, PONG, PING, CONT, CLOSE, 0x3, 0xB]))
    payload = draw(_payloads)
    if opcode == CLOSE:
        payload = draw(st.sampled_from([b"", b"\x03\xe8", b"\x03\xe8bye", b"\x00"]))
    fin = draw(st.booleans()) if draw(st.integers(0, 5)) == 0 else True
    mask = draw(st.integers(0, 20)) != 0
    rsv = draw(st.sampled_from([0, 0, 0, 0, 0, 1, 4]))
    built = frame(opcode, payload, fin=fin, mask=mask, rsv=rsv)
    if draw(st.integers(0, 15)) == 0 and len(payload) < 126:
        # The same length in a needlessly long (16-bit) field, which RFC 6455 forbids.
        built = bytes([built[0], (built[1] & 0x80) | 126]) + len(payload).to_bytes(2, "big") + built[2:]
    return built


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_frames(), min_size=1, max_size=8), st.lists(st.integers(0, 10_000), max_size=6))
async def test_fast_path_agrees_with_wsproto(frames: list[bytes], cuts: list[int]) -> None:
    _both(b"".join(frames), cuts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(_frames(), min_size=1, max_size=12),
    st.lists(st.integers(0, 10_000), max_size=6),
    st.integers(1, 6),
)
async def test_fast_path_agrees_with_wsproto_on_the_frame_budget(
    frames: list[bytes], cuts: list[int], frame_burst: int
) -> None:
    """With a budget of a few frames, both paths fail (1008) at the same frame."""
    _both(b"".join(frames), cuts, frame_burst)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=60), min_size=1, max_size=8), st.lists(st.integers(0, 600), max_size=8))
async def test_valid_stream_in_any_pieces(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(BINARY, p) for p in payloads)
    _both(stream, cuts)
    with _websocket(fast=True) as pair:
        messages, code, failed, _ = _run(pair, [stream])
        assert (messages, code, failed) == (payloads, None, False)
        assert pair[0]._fast  # nothing in a valid stream of data frames needed wsproto


async def test_fast_path_leaves_for_wsproto_at_the_first_unusual_frame() -> None:
    stream = frame(TEXT, b"one") + frame(TEXT, b"t", fin=False) + frame(CONT, b"wo")
    with _websocket(fast=True) as pair:
        messages, code, failed, _ = _run(pair, [stream])
        assert messages == [b"one", b"two"]
        assert (code, failed, pair[0]._fast) == (None, False, False)


async def test_pings_and_pongs_are_handled_without_leaving_the_fast_path() -> None:
    stream = frame(PONG, b"hb") + frame(PING, b"p1") + frame(TEXT, b"after") + frame(PING, b"")
    with _websocket(fast=True) as pair:
        messages, _, _, sent = _run(pair, [stream])
        assert messages == [b"after"]
        assert sent == [(PONG, b"p1"), (PONG, b"")]  # the pongs, in order
        assert pair[0]._fast


async def test_whole_data_frames_cost_no_budget_fragments_and_control_frames_do() -> None:
    """Three frames of budget: any number of whole messages; the fourth counted frame (here
    the final fragment of a message) fails the connection with 1008, on either path."""
    whole = frame(TEXT, b"w") * 50
    counted = frame(PING, b"") + frame(PONG, b"") + frame(TEXT, b"a", fin=False) + frame(CONT, b"b")
    for fast in (True, False):
        with _websocket(fast=fast, frame_burst=3) as pair:
            messages, code, failed, _ = _run(pair, [whole + counted + whole])
            assert (messages, code, failed) == ([b"w"] * 50, 1008, True)


async def test_unmasked_and_bad_utf8_frames_fail_as_wsproto_fails_them() -> None:
    for bad, code in ((frame(TEXT, b"x", mask=False), 1002), (frame(TEXT, b"\xff"), 1007)):
        with _websocket(fast=True) as pair:
            messages, close_code, failed, _ = _run(pair, [frame(TEXT, b"ok") + bad])
            assert (messages, close_code, failed) == ([b"ok"], code, True)
