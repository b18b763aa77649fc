"""One resume token presented on two instances at once, neither of them the owner (PROTOCOL.md
sections 15 and 16, "exactly one live session per user"): a level-2 session kept on one
``aleatoria serve`` process is resumed in the same moment on a second and a third. One
connection wins and stays live; the other is closed with 4001, whatever its welcome said.
When the second registration's eviction reached the first while it was reading the counts
for its welcome, after its owner had handed the session over, the first went on as
resumed: ``welcome {resumed: true}`` on a socket that was never closed and never answered
again (3 trials in 16 in a red-team run)."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from rawws import CLOSE
from redis_server import RedisServer
from scaleout_support import ServerProcess, serve_process
from test_resume_instances import level2, wait_kept

TRIALS = 20


class Side:
    def __init__(self) -> None:
        self.closed: int | None = None
        self.reading = trio.CancelScope()  # cancelled once the other side closed: this one lives


async def _resume(
    port: int, user: str, token: str, side: Side, go: trio.Event, one_closed: trio.Event
) -> None:
    await go.wait()
    async with level2(port, user, resume=token) as (ws, _):
        with side.reading:
            frame = await ws.expect_close(timeout=30)
            assert CLOSE == frame.opcode
            side.closed = int.from_bytes(frame.payload[:2], "big")
            one_closed.set()
            return
        # Not closed: it must be the live one, and answer.
        await ws.send_json({"type": "ping"})
        answer: dict[str, Any] = await ws.recv_json()
        assert "pong" == answer["type"]


async def _trial(owner: ServerProcess, two: ServerProcess, three: ServerProcess, user: str) -> str | None:
    async with level2(owner.port, user) as (_, welcome):
        token = welcome["resumeToken"]
    await wait_kept(owner, 1)
    sides = (Side(), Side())
    go, one_closed = trio.Event(), trio.Event()
    stuck = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_resume, two.port, user, token, sides[0], go, one_closed)
            nursery.start_soon(_resume, three.port, user, token, sides[1], go, one_closed)
            await trio.testing.wait_all_tasks_blocked()
            go.set()
            with trio.move_on_after(5):
                await one_closed.wait()
            for side in sides:
                side.reading.cancel()
    except* trio.TooSlowError:
        stuck = True
    if stuck:
        return f"{user}: a connection neither closed nor answering: {[s.closed for s in sides]}"
    codes = sorted(str(side.closed) for side in sides)
    if ["4001", "None"] != codes:
        return f"{user}: close codes {codes}, expected one 4001 and one live"
    return None


async def test_one_token_resumed_on_two_instances_leaves_one_live_session(redis_server: RedisServer) -> None:
    """Each trial: one connection is closed as replaced, the other answers."""
    flags = ["--redis-url", redis_server.url, "--resume-window", "1"]
    async with (
        serve_process(*flags) as owner,
        serve_process(*flags) as two,
        serve_process(*flags) as three,
    ):
        wrong = []
        for n in range(TRIALS):
            found = await _trial(owner, two, three, f"r{n}")
            if found is not None:
                wrong.append(found)
            for server in (owner, two, three):  # the survivor's cut session runs out (1 s)
                await wait_kept(server, 0)
        assert [] == wrong
