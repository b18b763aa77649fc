"""The WebSocket edge over real TCP: framing, control frames, limits, closing, timeouts.

Clients here are raw sockets (``rawws``) so every byte on the wire is the test's choice;
``support.connect`` (trio-websocket) stands in for a well-behaved second client.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from inmemory import InMemoryServer, inmemory_server
from rawws import (
    BINARY,
    CLOSE,
    CONT,
    PING,
    PONG,
    TEXT,
    RawWebSocket,
    close_frame,
    frame,
    health,
    http_get,
    open_raw_ws,
    open_tcp,
    text,
    upgrade_request,
)
from support import connect

from aleatoria.connection import WebSocket

# A server that would wait this long for a close answer: a test that sees TCP closed well
# within it proves the server did not wait.
PATIENT = 30.0


@pytest.fixture
async def patient() -> AsyncIterator[InMemoryServer]:
    """A server with ``close_timeout`` far beyond any test's patience."""
    async with inmemory_server(close_timeout=PATIENT) as running:
        yield running


async def assert_serves_others(server: InMemoryServer, user: str = "bystander") -> None:
    """A fresh, well-behaved client connects, chats in the Lobby and gets a pong."""
    async with connect(server, user) as peer:
        await peer.send({"type": "chat_message", "room": "Lobby", "payload": {"content": "still here"}})
        message = await peer.expect("chat_message")
        assert {"content": "still here"} == message["payload"]
        await peer.request({"type": "ping"}, "pong")


async def expect_failed(ws: RawWebSocket, code: int) -> None:
    """The server sends close ``code`` and then closes TCP by itself, without waiting for
    our close answer (RFC 6455 7.1.7: a failed connection is closed, not negotiated)."""
    close = await ws.expect_close()
    assert code == close.close_code, close
    await ws.expect_eof(timeout=PATIENT / 6)


# -- fragmentation and control frames ------------------------------------------------------


async def test_fragmented_text_message_is_reassembled(server: InMemoryServer) -> None:
    """A text message split over several continuation frames, even inside a UTF-8 character, arrives whole."""
    body = '{"type":"chat_message","room":"Lobby","payload":{"content":"héllo wörld ✓"}}'.encode()
    cut = body.index("✓".encode()) + 1  # in the middle of the three-byte character
    pieces = [body[:10], body[10:30], body[30:cut], body[cut:]]
    async with open_raw_ws(server, "frag") as ws:
        await ws.send_frame(frame(TEXT, pieces[0], fin=False))
        for piece in pieces[1:-1]:
            await ws.send_frame(frame(CONT, piece, fin=False))
        await ws.send_frame(frame(CONT, pieces[-1]))
        message = await ws.expect("chat_message")
        assert {"content": "héllo wörld ✓"} == message["payload"]
        await ws.roundtrip()


async def test_ping_between_fragments_is_answered_and_message_still_arrives(
    server: InMemoryServer,
) -> None:
    """Pings between fragments are answered at once with their payload and the message still arrives whole."""
    body = b'{"type":"ping","messageId":"between-fragments"}'
    async with open_raw_ws(server, "interleave") as ws:
        await ws.send_frame(frame(TEXT, body[:8], fin=False))
        await ws.send_frame(frame(PING, b"mid-message"))
        pong = await ws.read_frame()
        assert (PONG, b"mid-message") == (pong.opcode, pong.payload)
        await ws.send_frame(frame(CONT, body[8:20], fin=False))
        await ws.send_frame(frame(PING, b""))
        assert (PONG, b"") == ((pong := await ws.read_frame()).opcode, pong.payload)
        await ws.send_frame(frame(CONT, body[20:]))
        reply = await ws.expect("pong")
        assert "system" == reply["fromUser"]


async def test_ping_payload_is_echoed_in_pong(server: InMemoryServer) -> None:
    """A WebSocket ping's payload (up to the 125-byte control limit) comes back in the pong."""
    async with open_raw_ws(server, "pinger") as ws:
        for payload in (b"", b"abc", bytes(range(125))):
            await ws.send_frame(frame(PING, payload))
            pong = await ws.read_frame()
            assert (True, PONG, payload) == (pong.fin, pong.opcode, pong.payload)


async def test_empty_continuation_frames_are_not_stored() -> None:
    """Empty continuation frames are legal and cost no memory: 20,000 of them store nothing."""
    async with inmemory_server(frame_rate=0.0) as server, open_raw_ws(server, "empties") as ws:
        await ws.send_frame(frame(TEXT, b'{"type":', fin=False))
        await ws.send_frame(frame(CONT, b"", fin=False) * 20_000)
        await ws.send_frame(frame(PING, b"sync"))  # answered once all of the above is parsed
        assert PONG == (await ws.read_frame()).opcode
        # White-box: the only server-side WebSocket of this test's server.
        [server_ws] = [o for o in gc.get_objects() if isinstance(o, WebSocket) and not o.closing]
        assert 1 == len(server_ws._fragments)
        await ws.send_frame(frame(CONT, b'"ping"}'))
        await ws.expect("pong")


@pytest.mark.parametrize(
    "bound",
    [
        {"outbox_frames": 16},  # the bound in frames
        {"outbox_frames": 1_000_000, "outbox_bytes": 64 * 1024},  # the bound in bytes
    ],
)
async def test_ping_flood_without_reading_is_a_slow_consumer(bound: dict[str, int]) -> None:
    """A client flooding pings (frame budget off) without reading the pongs meets the outbox
    bound, in frames or in bytes: close 1013, not an unbounded pong queue."""
    flood = 60_000  # ~3x what the kernel buffers hold at rcvbuf=4096 (about 22,000 pongs)
    async with (
        inmemory_server(close_timeout=5.0, frame_rate=0.0, **bound) as server,
        open_raw_ws(server, "pingflood", rcvbuf=4096) as ws,
    ):
        with trio.fail_after(10):
            for _ in range(flood // 1000):
                await ws.send(frame(PING, b"p" * 125) * 1000)
            pongs = 0
            while (got := await ws.read_frame()).opcode == PONG:
                pongs += 1
        assert (CLOSE, 1013) == (got.opcode, got.close_code)
        assert pongs < flood
        await assert_serves_others(server)


async def test_binary_frame_with_json_is_accepted_like_text(server: InMemoryServer) -> None:
    """Binary frames carrying JSON are accepted like text frames; the replies are text frames.

    A choice: some clients send Blobs or ArrayBuffers, and the protocol is about the JSON,
    not the opcode.
    """
    async with open_raw_ws(server, "binary") as ws:
        await ws.send_frame(frame(BINARY, b'{"type":"ping"}'))
        await ws.expect("pong")
        await ws.send_frame(frame(BINARY, b'{"type":"get_rooms"}', fin=False))
        await ws.send_frame(frame(CONT, b""))  # an empty final fragment is legal
        assert ["Lobby"] == (await ws.expect("rooms_list"))["payload"]["rooms"]
        await ws.send_frame(frame(BINARY, b"\xff\xfe not json"))
        assert "error_response" == (await ws.recv_json())["type"]
        await ws.roundtrip()


async def test_handshake_and_first_frames_in_one_segment(server: InMemoryServer) -> None:
    """Frames sent in the same TCP write as the upgrade request are not lost."""
    first = text({"type": "ping", "messageId": "early"}) + frame(PING, b"early")
    async with open_raw_ws(server, "eager", first_bytes=first) as ws:
        got = [await ws.read_frame(), await ws.read_frame()]
        assert {PONG, TEXT} == {f.opcode for f in got}
        assert {"pong"} == {f.json()["type"] for f in got if f.opcode == TEXT}
        await ws.roundtrip()


async def test_non_json_text_is_answered_and_connection_stays_open(server: InMemoryServer) -> None:
    """Text that is not JSON gets an error_response; the same connection keeps working."""
    async with open_raw_ws(server, "sloppy") as ws:
        for junk in ("", "not json", "[1,2]", '{"type":5}'):
            await ws.send_frame(text(junk))
            reply = await ws.expect("error_response")
            assert reply["messageId"].startswith("err-")
        await ws.roundtrip()


# -- protocol errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        pytest.param([frame(TEXT, b'{"type":"ping","x":"\xc3\x28"}')], 1007, id="invalid-utf8"),
        pytest.param(
            [frame(TEXT, b'{"type":"ping","x":"\xe2\x82', fin=False), frame(CONT, b'"}')],
            1007,
            id="utf8-cut-at-message-end",
        ),
        pytest.param([frame(TEXT, b'{"type":"ping"}', mask=False)], 1002, id="unmasked"),
        pytest.param([frame(0x3, b"x")], 1002, id="reserved-opcode"),
        pytest.param([frame(TEXT, b'{"type":"ping"}', rsv=4)], 1002, id="rsv1-without-extension"),
        pytest.param([frame(PING, b"x", fin=False)], 1002, id="fragmented-control-frame"),
        pytest.param([frame(PING, b"x" * 126)], 1002, id="ping-over-125-bytes"),
        pytest.param([frame(CONT, b"x")], 1002, id="continuation-without-start"),
        pytest.param(
            [frame(TEXT, b"{", fin=False), frame(TEXT, b"}")], 1002, id="new-message-inside-fragments"
        ),
        pytest.param([frame(CLOSE, b"\x03")], 1002, id="close-payload-one-byte"),
        pytest.param([close_frame(999)], 1002, id="close-code-out-of-range"),
        pytest.param([close_frame(1005)], 1002, id="close-code-reserved"),
        pytest.param([close_frame(1000, b"\xff")], 1007, id="close-reason-invalid-utf8"),
    ],
)
async def test_protocol_error_fails_the_connection(
    patient: InMemoryServer, frames: list[bytes], code: int
) -> None:
    """A protocol violation gets close 1002 (1007 for bad UTF-8) and TCP closed; others are unaffected."""
    async with connect(patient, "neighbour") as neighbour, open_raw_ws(patient, "bad") as ws:
        await ws.roundtrip()
        for data in frames:
            await ws.send_frame(data)
        await expect_failed(ws, code)
        await neighbour.request({"type": "ping"}, "pong")
    await assert_serves_others(patient)


async def test_client_flooding_after_protocol_error_is_cut_off() -> None:
    """A client still sending after its protocol error is cut off within close_timeout."""
    async with inmemory_server(close_timeout=0.5) as server:
        async with open_raw_ws(server, "flood") as ws:
            await ws.send_frame(frame(TEXT, b"\xc3\x28"))
            assert 1007 == (await ws.expect_close()).close_code
            with trio.fail_after(5):
                try:
                    while True:  # the server closes while we are still writing
                        await ws.send(frame(TEXT, b"x" * 65536))
                except trio.BrokenResourceError:
                    pass
        await assert_serves_others(server)


# -- size limits ------------------------------------------------------------------------------


def _ping_of_size(size: int) -> bytes:
    """A valid JSON ping message of exactly ``size`` bytes."""
    head, tail = b'{"type":"ping","messageId":"m","pad":"', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


async def test_message_at_the_limit_is_accepted_one_byte_more_closes_1009(
    patient: InMemoryServer,
) -> None:
    """A message of exactly ``max_frame_bytes`` is processed; one byte more: close 1009."""
    limit = patient.config.max_frame_bytes
    assert 64 * 1024 == limit
    async with open_raw_ws(patient, "big") as ws:
        await ws.send_frame(frame(TEXT, _ping_of_size(limit)))
        await ws.expect("pong")
        await ws.send_frame(frame(TEXT, _ping_of_size(limit + 1)))
        await expect_failed(ws, 1009)
    await assert_serves_others(patient)


async def test_fragmented_message_over_the_limit_closes_1009(patient: InMemoryServer) -> None:
    """Fragments that are each small but together pass ``max_frame_bytes``: close 1009."""
    chunk = b"x" * 30_000
    async with open_raw_ws(patient, "drip") as ws:
        await ws.send_frame(frame(TEXT, b'{"type":"ping","pad":"', fin=False))
        for _ in range(3):
            await ws.send_frame(frame(CONT, chunk, fin=False))
        await expect_failed(ws, 1009)
    await assert_serves_others(patient)


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
async def test_huge_announced_length_closes_1009_without_buffering(
    patient: InMemoryServer, opcode: int
) -> None:
    """A header announcing 2**40 bytes gets 1009 once the limit has arrived, without waiting for the rest."""
    limit = patient.config.max_frame_bytes
    payload = b"x" * (limit + 1)
    async with open_raw_ws(patient, "huge") as ws:
        # ``frame`` masks only what follows the header; the rest of the 2**40 never comes.
        await ws.send_frame(frame(opcode, payload, length=2**40, fin=True))
        await expect_failed(ws, 1009)
    await assert_serves_others(patient)


# -- closing --------------------------------------------------------------------------------


async def test_clean_close_handshake(server: InMemoryServer) -> None:
    """Client close 1000 -> the server answers with close 1000 and closes TCP."""
    async with open_raw_ws(server, "polite") as ws:
        await ws.send_frame(close_frame(1000, b"bye"))
        answer = await ws.read_frame()
        assert (CLOSE, 1000) == (answer.opcode, answer.close_code)
        await ws.expect_eof()
    await assert_serves_others(server)


async def test_close_codes_of_the_clients_choosing_share_one_metric_label(server: InMemoryServer) -> None:
    """aleatoria_disconnects_total labels the codes we close with; the 2,000 codes 3000-4999
    a client may pick for itself count as "other" (one client added a series per code)."""
    for code in range(3000, 3010):
        async with open_raw_ws(server, f"coder{code}") as ws:
            await ws.send_frame(close_frame(code))
            assert code == (await ws.expect_close()).close_code
            await ws.expect_eof()
    await trio.testing.wait_all_tasks_blocked()
    metrics = (await http_get(server, "/metrics")).body.decode()
    assert 'aleatoria_disconnects_total{code="other"} 10.0' in metrics
    assert 'code="3000"' not in metrics


async def test_close_without_status_is_answered(server: InMemoryServer) -> None:
    """An empty close frame (no status code) is answered with an empty-or-1000 close and TCP closes."""
    async with open_raw_ws(server, "terse") as ws:
        await ws.send_frame(close_frame(None))
        answer = await ws.read_frame()
        assert CLOSE == answer.opcode
        assert answer.close_code in (None, 1000)
        await ws.expect_eof()


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_abrupt_disconnect_cleans_up(server: InMemoryServer, how: str) -> None:
    """A client dropping TCP (FIN or RST) without a close frame is cleaned up: match, /health, its user id."""
    async with connect(server, "stayer") as stayer:
        async with open_raw_ws(server, "leaver") as leaver:
            await leaver.send_json({"type": "user_available_webrtc"})
            await leaver.roundtrip()  # the pool entry is in place
            assert 2 == (await health(server))["connections"]
            role = await stayer.request({"type": "request_random_peer"}, "assign_role")
            assert "leaver" == role["payload"]["peerId"]
            assert "polite" == (await leaver.expect("assign_role"))["payload"]["role"]
            if how == "rst":
                leaver.reset_on_close()
        # The leaver's socket is gone without a close frame.
        hangup = await stayer.expect("hangup")
        assert ("leaver", {"reason": "peer_left"}) == (hangup["fromUser"], hangup["payload"])
        assert 1 == (await health(server))["connections"]
        async with open_raw_ws(server, "leaver") as again:
            await again.roundtrip()
            await stayer.request({"type": "ping"}, "pong")  # nothing else was queued for stayer
        await stayer.request({"type": "ping"}, "pong")


async def test_close_then_data_is_ignored(server: InMemoryServer) -> None:
    """Frames sent after the client's close frame are not processed; the close is answered."""
    async with open_raw_ws(server, "late") as ws:
        await ws.send_frame(close_frame(1000) + text({"type": "ping"}))
        answer = await ws.read_frame()
        assert (CLOSE, 1000) == (answer.opcode, answer.close_code)
        await ws.expect_eof()


# -- timeouts -------------------------------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", b"GET /ws?userId=slow HTTP/1.1\r\nHost: x\r\n"])
async def test_half_open_handshake_is_dropped_after_handshake_timeout(sent: bytes) -> None:
    """A silent or half-sent handshake is dropped after handshake_timeout, without blocking others."""
    async with inmemory_server(handshake_timeout=0.5) as server:
        start = trio.current_time()  # before the server can accept: its timer starts later
        async with open_tcp(server) as idle:
            await idle.send(sent)
            await assert_serves_others(server)  # while the half-open one is pending
            await idle.expect_eof(timeout=5.0)
            assert trio.current_time() - start >= 0.5
        await assert_serves_others(server, "after")


async def test_handshake_timeout_is_not_logged_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """A handshake timeout is routine: it is not logged as an error."""
    async with inmemory_server(handshake_timeout=0.2) as server, open_tcp(server) as idle:
        await idle.expect_eof(timeout=5.0)  # the server logs before it closes the socket
    assert [] == [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_peer_ignoring_pings_is_dropped_after_idle_timeout() -> None:
    """A client that never answers pings gets close 1001 after idle_timeout, then TCP is closed."""
    async with inmemory_server(ping_interval=0.2, idle_timeout=0.6, close_timeout=0.3) as server:
        start = trio.current_time()  # before the server sees the connection
        async with open_raw_ws(server, "deaf") as ws:
            pings = 0
            with trio.fail_after(5):
                while (got := await ws.read_frame()).opcode != CLOSE:
                    pings += got.opcode == PING
            assert 1001 == got.close_code
            assert trio.current_time() - start >= 0.6
            assert pings >= 1
            await ws.expect_eof()
        await assert_serves_others(server)


async def test_peer_answering_pings_stays_connected_past_idle_timeout() -> None:
    """A silent client whose library answers pings (trio-websocket) stays connected past idle_timeout."""
    async with (
        inmemory_server(ping_interval=0.2, idle_timeout=0.6) as server,
        connect(server, "alive") as peer,
    ):
        with trio.move_on_after(1.5):  # 2.5 idle timeouts of silence from the app
            message = await peer.recv(timeout=60)
            raise AssertionError(f"unexpected {message}")
        await peer.request({"type": "ping"}, "pong")


async def test_raw_peer_answering_pings_stays_connected() -> None:
    """A raw client that answers each ping with a pong stays open past the idle timeout."""
    async with (
        inmemory_server(ping_interval=0.2, idle_timeout=0.6) as server,
        open_raw_ws(server, "ponger") as ws,
    ):
        pings = 0
        with trio.move_on_after(1.5):
            while True:
                got = await ws.read_frame(timeout=60)
                assert PING == got.opcode, got
                pings += 1
                await ws.send_frame(frame(PONG, got.payload))
        assert pings >= 4
        await ws.roundtrip()


async def test_upgrade_answer_carries_the_rfc_accept_token(server: InMemoryServer) -> None:
    """The 101 answer carries RFC 6455's sample accept token and the session opens with room_joined."""
    async with open_tcp(server) as conn:
        await conn.send(upgrade_request(server.port, "/ws?userId=hand"))
        head = (await conn.read_until(b"\r\n\r\n")).decode("latin-1").lower()
        assert head.startswith("http/1.1 101 ")
        assert "sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n" in head
        assert "upgrade: websocket\r\n" in head
        ws = RawWebSocket(conn.stream)
        ws.buffer = conn.buffer  # whatever arrived after the head
        assert "room_joined" == (await ws.recv_json())["type"]
