"""``--workers N`` stops cleanly on SIGINT and SIGTERM, sent to the parent alone (``kill PID``)
or to the whole process group (Ctrl-C in a terminal, systemd's default ``KillMode``): every
worker drains — 1001 to its clients, history flushed, presence removed — and the parent
exits 0. Each case is a real process tree on a real redis-server."""

from __future__ import annotations

import os
import signal

import pytest
import trio
import trio_websocket
from redis_server import RedisServer
from scaleout_support import FAST_PRESENCE, redis_client, serve_process
from support import SocketPeer, close_of, connect

from aleatoria.store.redis_presence import INSTANCES_KEY, PRESENCE_KEY

FAST = [
    "--presence-ttl",
    str(FAST_PRESENCE["presence_ttl"]),
    "--heartbeat-interval",
    str(FAST_PRESENCE["heartbeat_interval"]),
]
USERS = [f"u{n}" for n in range(8)]


async def _close_code(client: SocketPeer) -> int:
    """The close code ``client`` sees once the server closes it."""
    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
        while True:
            await client.recv()
    return close_of(closed.value)[0]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("to", ["parent", "group"])
async def test_workers_drain_and_exit_0_on_a_signal(redis_server: RedisServer, signum: int, to: str) -> None:
    """Eight users on two workers (in a room, one waiting in the pool) and a room message
    just sent; one signal to the parent or to its group: every user is closed with 1001, the
    parent exits 0 with ``event=workers_stopped`` (and warned once that auth is off), and
    Redis holds the message in the room's history but no presence, no instance, no one in
    the pool."""
    url = redis_server.url
    async with serve_process("--redis-url", url, "--workers", "2", *FAST, own_group=True) as server:
        codes: dict[str, int] = {}
        async with trio.open_nursery() as nursery:
            clients: list[SocketPeer] = []
            all_in = trio.Event()
            signalled = trio.Event()

            async def hold(user: str) -> None:
                async with connect(server.port, user, "Den", skip=True) as client:
                    clients.append(client)
                    if len(clients) == len(USERS):
                        all_in.set()
                    await signalled.wait()  # until then the test talks through this client
                    codes[user] = await _close_code(client)

            for user in USERS:
                nursery.start_soon(hold, user)
            with trio.fail_after(10):
                await all_in.wait()
            with redis_client(url) as r:
                assert set(USERS) == {u.decode() for u in r.hkeys(PRESENCE_KEY)}
                assert 2 == r.zcard(INSTANCES_KEY)  # both workers registered
            await clients[0].send({"type": "user_available_webrtc"})
            await clients[0].sync()
            # Accepted (the pong follows it), not necessarily written yet: the drain writes it.
            await clients[1].send(
                {"type": "chat_message", "room": "Den", "payload": {"content": "last words"}}
            )
            await clients[1].sync()
            if to == "parent":
                os.kill(server.process.pid, signum)
            else:
                os.killpg(server.process.pid, signum)
            signalled.set()
            with trio.fail_after(20):
                code = await server.process.wait()
        assert 0 == code, server.text()[-3000:]
    assert dict.fromkeys(USERS, 1001) == codes
    assert "event=workers_stopped" in server.text()
    assert "failed=" not in server.text()
    assert 1 == server.text().count("event=auth_disabled")  # once for the deployment
    with redis_client(url) as r:
        assert [] == r.hkeys(PRESENCE_KEY)
        assert 0 == r.zcard(INSTANCES_KEY)
        assert set() == r.smembers("available:webrtc")
        history = r.zrange("room:messages:Den", 0, -1)
        assert 1 == len(history) and b"last words" in history[0]


@pytest.mark.parametrize("when", ["during", "after"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_a_second_signal_still_exits_0(redis_server: RedisServer, signum: int, when: str) -> None:
    """An impatient operator signals the parent again, while its workers drain or once they
    have stopped (``event=workers_stopped`` logged, the parent on its way out): the parent
    still exits 0. It was killed by the second signal (exit -15, or -2 after a
    KeyboardInterrupt traceback): leaving its signal receiver put the default handlers back
    and re-raised a signal the receiver still held."""
    async with serve_process("--redis-url", redis_server.url, "--workers", "2", *FAST) as server:
        server.process.send_signal(signum)
        if when == "after":
            with trio.fail_after(20):
                await server.wait_for_log(lambda text: "event=workers_stopped" in text)
        else:
            with trio.fail_after(20):
                await server.wait_for_log(lambda text: "action=stopping_workers" in text)
        # Again and again until it exits: also while the interpreter finalizes.
        with trio.fail_after(20):
            while server.process.returncode is None:
                server.process.send_signal(signum)
                with trio.move_on_after(0.002):
                    await server.process.wait()
        code = server.process.returncode
        assert 0 == code, server.text()[-3000:]
        assert "Traceback" not in server.text()
