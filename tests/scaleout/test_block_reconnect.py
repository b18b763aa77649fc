"""A block or a shadow ban made while its user reconnects on another instance (PROTOCOL.md
section 13): B, on one ``aleatoria serve`` process, blocks U (or an operator shadow-bans U
there) in the same moment as U, connected there too, opens a new connection on a second
process. Whichever comes first, U's new connection may not write to B: a blocked U's DM is
refused with ``peer_unavailable`` (as if B were offline), a shadow-banned U's reaches U alone.
The new connection read U's blocks and ban at its handshake, before the block or ban was
stored, and the notice went where presence named U then (its old connection), so U kept
writing to B -- delivered and stored -- for as long as that connection lived (9 trials in 20
in a red-team run)."""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio_websocket
from adminapi import TOKEN, admin
from redis_server import RedisServer
from scaleout_support import serve_process
from support import SocketPeer, connect

TRIALS = 20


async def _trial(port_one: int, port_two: int, n: int, shadow: bool) -> str | None:
    """One race; what went wrong (None: nothing)."""
    user, blocker, other = f"u{n}", f"b{n}", f"c{n}"
    async with (
        connect(port_one, blocker, skip=True) as b,
        connect(port_one, user, skip=True) as old,
        connect(port_two, other, skip=True) as c,
    ):
        new: list[SocketPeer] = []
        ready, replaced, done = trio.Event(), trio.Event(), trio.Event()

        async def until_replaced() -> None:
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                while True:
                    await old.recv()
            replaced.set()

        async def reconnect() -> None:
            async with connect(port_two, user, skip=True) as client:  # joined: registered
                new.append(client)
                ready.set()
                await done.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(until_replaced)
            nursery.start_soon(reconnect)
            with trio.fail_after(10):
                if shadow:
                    body = {"user": user, "shadow": True}
                    assert 201 == (await admin(port_one, "POST", "/admin/bans", body=body)).status
                else:
                    await b.send({"type": "block_user", "payload": {"user": user}})
                    await b.expect("user_blocked", skip=True)
                await ready.wait()
                await replaced.wait()  # B's instance no longer holds U's old connection
                client = new[0]
                # B's instance sent any notice of the block before this DM, and presence names
                # the new connection by now: once the DM is there, so is what U's connection
                # will ever hear of the block.
                await b.send({"type": "chat_message", "toUser": user, "payload": {"content": "mark"}})
                await client.expect("chat_message", skip=True)
                await client.send({"type": "chat_message", "toUser": blocker, "payload": {"content": "hi"}})
                reply = await client.recv()
                while reply["type"] not in ("chat_message", "error"):
                    reply = await client.recv()
                # What B got before a DM C sends it afterwards from U's new instance.
                await c.send({"type": "chat_message", "toUser": blocker, "payload": {"content": "after"}})
                heard = []
                while (message := await b.expect("chat_message", skip=True))["payload"]["content"] != "after":
                    if message["fromUser"] == user:
                        heard.append(message["payload"]["content"])
            done.set()
        if heard:
            return f"{blocker} got {user}'s DM {heard}"
        if shadow:
            return None if reply["type"] == "chat_message" else f"shadow-banned {user}'s DM: {reply}"
        if reply["type"] == "error" and "peer_unavailable" == reply["payload"]["code"]:
            return None
        return f"{user}'s DM to {blocker}, who blocked it: {reply}"


@pytest.mark.parametrize("shadow", [False, True], ids=["block", "shadow-ban"])
async def test_a_block_racing_a_reconnect_on_another_instance_holds(
    redis_server: RedisServer, shadow: bool
) -> None:
    """Repeated races: the new connection's DM never reaches B."""
    flags = ["--redis-url", redis_server.url, "--admin-token", TOKEN]
    async with serve_process(*flags) as one, serve_process(*flags) as two:
        wrong = []
        for n in range(TRIALS):
            found = await _trial(one.port, two.port, n, shadow)
            if found is not None:
                wrong.append(found)
        assert [] == wrong
