"""A ban while its user is resuming on another instance (PROTOCOL.md sections 13 and 15): a
level-2 session dropped on one ``aleatoria serve`` process is resumed on a second one while an
operator bans the user through the first. Whichever comes first, the user does not stay
connected: its handshake is refused with 403 or its new connection is closed with 4003. The
resume's handshake used to pass the ban check before the ban was stored, and the kick found
only the kept session (on the first instance) to close: the resume failed there and the user
got a fresh session on the second instance that nothing closed (6 trials in 10 in a
red-team run)."""

from __future__ import annotations

import trio
from adminapi import TOKEN, admin
from rawws import CLOSE
from redis_server import RedisServer
from scaleout_support import ServerProcess, serve_process
from test_resume_instances import level2, wait_kept

TRIALS = 10


async def _trial(owner: ServerProcess, other: ServerProcess, user: str) -> str | None:
    """One race; what went wrong (None: nothing)."""
    async with level2(owner.port, user) as (_, welcome):
        token = welcome["resumeToken"]
    await wait_kept(owner, 1)  # the cut is noticed: the session is kept
    outcome: list[str] = []

    async def resume() -> None:
        try:
            async with level2(other.port, user, resume=token) as (ws, _):
                with trio.move_on_after(5):
                    frame = await ws.expect_close()
                    assert CLOSE == frame.opcode
                    code = int.from_bytes(frame.payload[:2], "big")
                    outcome.append("" if code == 4003 else f"closed with {code}")
                    return
                outcome.append("still connected 5 s after the ban")
        except AssertionError as refused:  # the upgrade's answer was not 101
            outcome.append("" if "status=403" in str(refused) else f"refused: {refused}")

    async def ban() -> None:
        response = await admin(owner.port, "POST", "/admin/bans", body={"user": user})
        assert 201 == response.status, response

    async with trio.open_nursery() as nursery:
        nursery.start_soon(resume)
        nursery.start_soon(ban)
    await wait_kept(owner, 0)
    return outcome[0] or None


async def test_a_ban_while_resuming_on_another_instance_closes_the_user(redis_server: RedisServer) -> None:
    """Each trial: drop, then resume on the other instance and ban at once; the user ends
    refused or closed with 4003, never connected."""
    flags = ["--redis-url", redis_server.url, "--admin-token", TOKEN]
    async with serve_process(*flags) as one, serve_process(*flags) as two:
        wrong = []
        for n in range(TRIALS):
            found = await _trial(one, two, f"v{n}")
            if found is not None:
                wrong.append(f"v{n}: {found}")
        assert [] == wrong
