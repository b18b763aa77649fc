"""Every frame counts (PROTOCOL.md section 16): the per-connection frame budget over real TCP.

Pings, pongs, a peer's close and every frame of a fragmented message (empty continuations
included) take a token from a bucket of ``frame_rate``/s, ``frame_burst`` at most; a
connection over it is failed with 1008. Whole data messages are the message rate limit's
business and cost nothing here. Floods come from raw sockets (``rawws``); the round-trip
test floods from a separate process, as an attacker would, while a calm client measures.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys

import pytest
import trio
from inmemory import InMemoryServer, inmemory_server
from rawws import CLOSE, CONT, PING, PONG, TEXT, RawWebSocket, close_frame, frame, open_raw_ws
from support import connect, running_server

# A server that would wait this long for a close answer: a test that sees TCP closed well
# within it proves the server did not wait.
PATIENT = 30.0

# Empty control frames: built once, repeated by the thousand.
EMPTY_PING = frame(PING, b"")
EMPTY_PONG = frame(PONG, b"")


async def assert_serves_others(server: InMemoryServer, user: str = "bystander") -> None:
    """A fresh, well-behaved client connects and gets a pong."""
    async with connect(server, user) as peer:
        await peer.request({"type": "ping"}, "pong")


async def expect_policy_close(ws: RawWebSocket) -> int:
    """Read pongs until the server's close frame, which must be 1008; then the server
    closes TCP by itself (a failed connection: it does not wait for our close). Returns the
    number of pongs that came first."""
    pongs = 0
    with trio.fail_after(PATIENT / 3):
        while (got := await ws.read_frame()).opcode != CLOSE:
            assert got.opcode in (PONG, TEXT), got
            pongs += got.opcode == PONG
    assert 1008 == got.close_code, got
    assert b"too many frames" == got.payload[2:]
    await ws.expect_eof(timeout=PATIENT / 6)
    return pongs


FLOODS = {
    "pings": EMPTY_PING * 2000,
    "pongs": EMPTY_PONG * 2000,
    "pings-with-payload": frame(PING, b"p" * 125) * 2000,
    "empty-continuations": frame(TEXT, b'{"type":', fin=False) + frame(CONT, b"", fin=False) * 2000,
    "one-byte-continuations": frame(TEXT, b'{"type":', fin=False) + frame(CONT, b" ", fin=False) * 2000,
    "control-frames-inside-a-message": frame(TEXT, b"{", fin=False) + (EMPTY_PING + EMPTY_PONG) * 1000,
}


@pytest.mark.parametrize("flood", FLOODS.values(), ids=FLOODS.keys())
async def test_flood_is_closed_with_1008(flood: bytes) -> None:
    """A flood of frames that are not whole messages (pings, pongs, fragments, control
    frames on the fast path or wsproto's) gets close 1008 once the burst is spent, at most
    a burst's worth of pongs before it, and TCP closed; others are unaffected."""
    async with inmemory_server(close_timeout=PATIENT) as server:
        burst = server.config.frame_burst
        assert (200.0, 400) == (server.config.frame_rate, burst)  # the defaults
        async with connect(server, "neighbour") as neighbour, open_raw_ws(server, "flood") as ws:
            await ws.roundtrip()
            await ws.send(flood)
            assert await expect_policy_close(ws) <= burst
            await neighbour.request({"type": "ping"}, "pong")
        await assert_serves_others(server)


async def test_burst_frames_pass_and_the_next_one_is_closed() -> None:
    """With no time to refill, exactly ``frame_burst`` control frames are answered; whole
    data messages in between cost nothing; the next control frame closes with 1008."""
    async with (
        inmemory_server(frame_rate=0.001, frame_burst=20, close_timeout=PATIENT) as server,
        open_raw_ws(server, "edge") as ws,
    ):
        await ws.send(EMPTY_PING * 20)
        for _ in range(20):
            assert PONG == (await ws.read_frame()).opcode
        for _ in range(50):  # whole messages: the message rate limit's business
            await ws.roundtrip()
        await ws.send(EMPTY_PONG)
        assert 0 == await expect_policy_close(ws)


async def test_a_close_over_the_budget_is_answered_with_1008() -> None:
    """The peer's close counts too: with the budget spent, its close 1000 is answered 1008."""
    async with inmemory_server(frame_rate=0.001, frame_burst=3) as server:
        async with open_raw_ws(server, "closer") as ws:
            await ws.send(EMPTY_PING * 3 + close_frame(1000))
            for _ in range(3):
                assert PONG == (await ws.read_frame()).opcode
            answer = await ws.read_frame()
            assert (CLOSE, 1008) == (answer.opcode, answer.close_code)
            await ws.expect_eof()
        async with open_raw_ws(server, "closer") as ws:  # within the budget: echoed
            await ws.send(close_frame(1000))
            answer = await ws.read_frame()
            assert (CLOSE, 1000) == (answer.opcode, answer.close_code)
            await ws.expect_eof()


async def test_client_under_the_budget_is_never_closed() -> None:
    """A client sending control frames and fragments at about the frame rate, far more than
    the burst in all, is never closed: the bucket refills with time."""
    async with (
        inmemory_server(frame_rate=100.0, frame_burst=20) as server,
        open_raw_ws(server, "calm") as ws,
    ):
        body = b'{"type":"ping"}'
        for _ in range(12):  # 12 x 10 counted frames = 6 bursts' worth
            await ws.send(EMPTY_PING * 4 + EMPTY_PONG * 2)
            await ws.send(frame(TEXT, body[:5], fin=False) + frame(CONT, b"", fin=False))
            await ws.send(frame(CONT, body[5:9], fin=False) + frame(CONT, body[9:]))
            for _ in range(4):
                assert PONG == (await ws.read_frame()).opcode
            await ws.expect("pong")
            # Pacing, not synchronisation: 0.1 s refills 10 tokens, what a round spends.
            await trio.sleep(0.1)
        await ws.roundtrip()


async def test_budget_off_answers_every_ping() -> None:
    """``frame_rate`` 0 turns the budget off: 5,000 pings are all answered, in order."""
    async with inmemory_server(frame_rate=0.0) as server, open_raw_ws(server, "pinger") as ws:
        await ws.send(b"".join(frame(PING, b"%d" % i) for i in range(5000)))
        for i in range(5000):
            got = await ws.read_frame()
            assert (PONG, b"%d" % i) == (got.opcode, got.payload)
        await ws.roundtrip()


# -- one flooding connection does not slow the others ---------------------------------------

# The attacker: reconnects and floods as fast as it can, forever; prints "flooding" once
# upgraded and "closed <code>" when the server closes it (1006: no close frame came).
ATTACKER = r"""
import socket, sys

port, kind = int(sys.argv[1]), sys.argv[2]
ping, pong = bytes((0x89, 0x80, 0, 0, 0, 0)), bytes((0x8A, 0x80, 0, 0, 0, 0))
if kind == "pings":
    first, flood = b"", ping * 10_000
else:  # empty continuation frames, which wsproto parses
    first, flood = bytes((0x01, 0x80, 0, 0, 0, 0)), bytes((0x00, 0x80, 0, 0, 0, 0)) * 10_000
n = 0
while True:
    n += 1
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        (
            f"GET /ws?userId=attacker{n}&room=Attack HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    assert data.startswith(b"HTTP/1.1 101 "), data
    data = data.split(b"\r\n\r\n", 1)[1]
    print("flooding", flush=True)
    code = eof = None
    try:
        sock.sendall(first)
    except OSError:
        pass
    while code is None:
        try:
            sock.sendall(flood)
        except OSError:
            pass  # reset by the server: read what came before it
        while True:
            try:
                chunk = sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                eof = True
                break
            data += chunk
        while len(data) >= 2:  # server frames: unmasked
            size, head = data[1] & 0x7F, 2
            if size == 126:
                size, head = int.from_bytes(data[2:4], "big"), 4
            elif size == 127:
                size, head = int.from_bytes(data[2:10], "big"), 10
            if len(data) < head + size:
                break
            if data[0] & 0x0F == 0x8:
                code = int.from_bytes(data[head : head + 2], "big")
            data = data[head + size :]
        if code is None and eof:
            code = 1006
    print("closed", code, flush=True)
    sock.close()
"""


def p99(samples: list[float]) -> float:
    """The nearest-rank 99th percentile."""
    return sorted(samples)[math.ceil(0.99 * len(samples)) - 1]


@pytest.mark.loopback  # the attackers are processes of their own, over TCP
@pytest.mark.parametrize("kind", ["pings", "empty-continuations"])
async def test_flooding_connection_does_not_raise_others_round_trip_p99(kind: str) -> None:
    """While an attacker in another process floods (and reconnects each time it is closed
    with 1008), a calm client's round trip (``ping`` -> ``pong``) keeps a p99 under 50 ms,
    over at least 200 round trips and 5 attacker connections."""
    async with running_server() as server, connect(server, "calm", "Calm") as calm:
        closes: list[int] = []
        attacked = trio.Event()
        enough = trio.Event()

        async def read_attacker(stdout: trio.abc.ReceiveStream) -> None:
            buffer = b""
            while chunk := await stdout.receive_some():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line == b"flooding":
                        attacked.set()
                    else:
                        closes.append(int(line.split()[1]))
                        if len(closes) >= 5:
                            enough.set()

        round_trips: list[float] = []
        async with trio.open_nursery() as nursery:
            # Cancelling the nursery kills the attacker (run_process's cancellation).
            attacker = functools.partial(
                trio.run_process,
                [sys.executable, "-c", ATTACKER, str(server.port), kind],
                stdout=subprocess.PIPE,
                check=False,
            )
            process = await nursery.start(attacker)
            nursery.start_soon(read_attacker, process.stdout)
            with trio.fail_after(60):
                await attacked.wait()
                while len(round_trips) < 200 or not enough.is_set():
                    start = trio.current_time()
                    await calm.send({"type": "ping"})
                    while (await calm.recv())["type"] != "pong":
                        pass
                    round_trips.append(trio.current_time() - start)
            nursery.cancel_scope.cancel()
        assert closes and {1008} == set(closes), closes
        assert p99(round_trips) < 0.050, (p99(round_trips), max(round_trips), len(round_trips))
        await calm.request({"type": "ping"}, "pong")  # never closed
