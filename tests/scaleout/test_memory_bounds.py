"""Memory is bounded by configuration, not by traffic (PROTOCOL.md section 16): a real server
process is driven with the patterns that once grew it without bound -- posting into ever new
rooms and sending DMs to users who never connect, 32 KB each -- and its resident
memory, read from /proc, stays under the history budget plus a fixed margin, in memory mode
and in Redis mode (which keeps no second copy of what Redis holds)."""

from __future__ import annotations

import itertools
from pathlib import Path

import orjson
import pytest
import trio
from redis_server import RedisServer
from scaleout_support import serve_process
from support import connect

BUDGET_MB = 16
# What the process may grow beyond the budget: allocator slack, the write buffer (Redis
# mode), sockets and per-connection state of the attackers. Unbounded, the same drive grows
# the server by several times this (the test checks it drove that much).
MARGIN_MB = 48
# The drive goes on until it has sent this much (enough to break the bound, unbounded) or
# the time is up: a fixed time drove too little on a loaded machine (73 MB in 8 s).
DRIVE_MB = 1.5 * (BUDGET_MB + MARGIN_MB)
DRIVE_SECONDS = 40.0
CLIENTS = 6
# 4,000 characters of content and the rest of the payload budget (32 KiB) in another field.
PAYLOAD = {"content": "x" * 4000, "extra": "y" * 28_000}
PAYLOAD_BYTES = len(orjson.dumps(PAYLOAD))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def _drive(port: int, user: str, pattern: str, deadline: float, sent: list[int]) -> None:
    """Send as fast as the server answers (a window of 32 frames in flight), until all the
    drivers together have sent ``DRIVE_MB`` or ``deadline`` passes."""
    counter = itertools.count()
    async with connect(port, user, skip=True) as client:
        window = trio.Semaphore(32)

        async def read() -> None:
            while True:
                message = await client.recv()
                if message["type"] in ("chat_message", "room_left", "error"):
                    window.release()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            while trio.current_time() < deadline and sent[0] < DRIVE_MB * 2**20:
                n = next(counter)
                if pattern == "rooms":
                    # A new room each time: join, post, leave (the room's history stays).
                    room = f"{user}-r{n}"
                    await client.send({"type": "join_room", "room": room})
                    await window.acquire()
                    frame = {"type": "chat_message", "room": room, "payload": PAYLOAD}
                    await client.ws.send_message(orjson.dumps(frame).decode())
                    await window.acquire()
                    await client.send({"type": "leave_room", "room": room})
                else:
                    # A DM to a user who never connects (stored for a day).
                    await window.acquire()
                    frame = {
                        "type": "chat_message",
                        "toUser": f"{user}-ghost{n}",
                        "payload": PAYLOAD,
                    }
                    await client.ws.send_message(orjson.dumps(frame).decode())
                sent[0] += PAYLOAD_BYTES
            nursery.cancel_scope.cancel()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["memory", "redis"])
async def test_rss_stays_within_the_history_budget(mode: str, request: pytest.FixtureRequest) -> None:
    flags = [
        "--history-memory-mb",
        str(BUDGET_MB),
        "--new-dm-per-hour",
        "1000000",  # the per-user limit is tested elsewhere; here the budget is the bound
        "--frame-rate",
        "0",
    ]
    if mode == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        flags += ["--redis-url", server.url]
    async with serve_process(*flags) as process:
        pid = process.process.pid
        # Warm up (imports, first allocations) before the baseline.
        async with connect(process.port, "warmup", skip=True) as warm:
            await warm.sync()
        before = rss_mb(pid)
        sent = [0]
        deadline = trio.current_time() + DRIVE_SECONDS
        async with trio.open_nursery() as nursery:
            for n in range(CLIENTS):
                pattern = "rooms" if n % 2 else "dms"
                nursery.start_soon(_drive, process.port, f"attacker{n}", pattern, deadline, sent)
        grown = rss_mb(pid) - before
        driven_mb = sent[0] / 2**20
        # The drive must be able to break the bound for the test to mean anything.
        assert driven_mb >= DRIVE_MB, f"drove only {driven_mb:.0f} MB in {DRIVE_SECONDS:.0f} s"
        assert grown < BUDGET_MB + MARGIN_MB, f"grew {grown:.0f} MB after driving {driven_mb:.0f} MB"
        async with connect(process.port, "calm", skip=True) as calm:  # and it still serves
            await calm.sync()
