"""The inbound fast path (``WebSocket._take_simple``) against wsproto alone.

The fast path unwraps common frames itself and hands everything else to wsproto. These
tests feed the same bytes, cut at arbitrary points, to a WebSocket using the fast path and to
one forced onto wsproto from the first byte, and require the same messages, the same close
code and the same failure -- for valid streams and for streams with every kind of fault.
(The tests are async only because a WebSocket reads trio's clock.)
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings
from rawws import BINARY, CLOSE, CONT, PING, PONG, TEXT, frame

from aleatoria.flusher import Flusher
from aleatoria.websocket import WebSocket

MAX_MESSAGE = 3000


@contextmanager
def _websocket(*, fast: bool) -> Iterator[WebSocket]:
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
            flusher=Flusher(),  # never run: these tests only parse
        )
        ws._fast = fast
        yield ws
    finally:
        ours.close()
        theirs.close()


def _run(ws: WebSocket, chunks: list[bytes]) -> tuple[list[bytes], int | None, bool]:
    """Feed ``chunks`` as ``_receive_loop`` does; the messages as bytes, the close code, and
    whether the connection failed."""
    messages: list[str | bytes | bytearray] = []
    for chunk in chunks:
        ws._feed(chunk, messages)
        if not ws._fast and not ws._collect(messages):
            break
    as_bytes = [m.encode() if isinstance(m, str) else bytes(m) for m in messages]
    return as_bytes, ws.close_code, ws._failed


def _both(stream: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    chunks = [c for c in chunks if c] or [b""]
    with _websocket(fast=True) as fast, _websocket(fast=False) as reference:
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


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=60), min_size=1, max_size=8), st.lists(st.integers(0, 600), max_size=8))
async def test_valid_stream_in_any_pieces(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(BINARY, p) for p in payloads)
    _both(stream, cuts)
    with _websocket(fast=True) as ws:
        messages, code, failed = _run(ws, [stream])
        assert (messages, code, failed) == (payloads, None, False)
        assert ws._fast  # nothing in a valid stream of data frames needed wsproto


async def test_fast_path_leaves_for_wsproto_at_the_first_unusual_frame() -> None:
    stream = frame(TEXT, b"one") + frame(PING, b"p") + frame(TEXT, b"two")
    with _websocket(fast=True) as ws:
        messages, code, failed = _run(ws, [stream])
        assert messages == [b"one", b"two"]
        assert (code, failed, ws._fast) == (None, False, False)


async def test_pongs_are_consumed_without_leaving_the_fast_path() -> None:
    with _websocket(fast=True) as ws:
        messages, _, _ = _run(ws, [frame(PONG, b"hb") + frame(TEXT, b"after")])
        assert messages == [b"after"]
        assert ws._fast


async def test_unmasked_and_bad_utf8_frames_fail_as_wsproto_fails_them() -> None:
    for bad, code in ((frame(TEXT, b"x", mask=False), 1002), (frame(TEXT, b"\xff"), 1007)):
        with _websocket(fast=True) as ws:
            messages, close_code, failed = _run(ws, [frame(TEXT, b"ok") + bad])
            assert (messages, close_code, failed) == ([b"ok"], code, True)
