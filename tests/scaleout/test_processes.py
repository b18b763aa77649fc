"""Real ``aleatoria serve`` processes sharing one Redis: an instance killed with ``kill -9``
leaves no ghosts, the others keep working, a restarted instance rejoins; ``--workers``."""

from __future__ import annotations

import os
import re
import signal
import sys

import pytest
import trio
from health import get_json
from redis_server import RedisServer
from scaleout_support import FAST_PRESENCE, ServerProcess, redis_client, serve_process, wait_until
from support import SocketPeer, connect

import aleatoria.workers
from aleatoria.cli import main
from aleatoria.config import Config
from aleatoria.store.redis_presence import INSTANCES_KEY, PRESENCE_KEY, instance_channel
from aleatoria.workers import Supervisor

POOL = "available:webrtc"
FAST = [
    "--presence-ttl",
    str(FAST_PRESENCE["presence_ttl"]),
    "--heartbeat-interval",
    str(FAST_PRESENCE["heartbeat_interval"]),
]
FAST_BOUND = FAST_PRESENCE["presence_ttl"] + FAST_PRESENCE["heartbeat_interval"]

# The subscribers of a channel as the liveness check counts them (plain and sharded), run on
# the pool's slot so that it works on a cluster too.
_LISTENERS = """
local n = redis.call('PUBSUB', 'NUMSUB', ARGV[1])[2]
local ok, sharded = pcall(redis.call, 'PUBSUB', 'SHARDNUMSUB', ARGV[1])
if ok then n = n + sharded[2] end
return n
"""


def _ghosts(r: object, users: set[str]) -> set[str]:
    """Which of ``users`` are still in the pool or in presence."""
    pooled = {m.decode() for m in r.smembers(POOL)}  # type: ignore[attr-defined]
    present = {u.decode() for u in r.hkeys(PRESENCE_KEY)}  # type: ignore[attr-defined]
    return users & (pooled | present)


async def _disconnected(client: SocketPeer) -> None:
    import trio_websocket

    with pytest.raises(trio_websocket.ConnectionClosed):
        while True:
            await client.recv()


async def test_kill_9_leaves_no_ghosts_and_a_restarted_instance_rejoins(shared_redis: str) -> None:
    """Three instances; the third is killed with SIGKILL while its users are pooled, matched
    and in a room. Nobody is matched with them from that moment; they leave pool and
    presence within presence_ttl + heartbeat_interval; the survivor of a broken match is
    told; the other instances keep working; a restarted instance takes users again."""
    url = shared_redis
    async with (
        serve_process("--redis-url", url, *FAST) as one,
        serve_process("--redis-url", url, *FAST) as two,
        serve_process("--redis-url", url, *FAST) as three,
        connect(one.port, "alice", "Den", skip=True) as alice,
        connect(two.port, "bob", "Den", skip=True) as bob,
    ):
        doomed = {"carol", "dave"}
        async with (
            connect(three.port, "carol", "Den", skip=True) as carol,
            connect(three.port, "dave", "Den", skip=True) as dave,
        ):
            await dave.send({"type": "user_available_webrtc"})
            await dave.sync()
            match = await alice.request({"type": "request_random_peer"}, "assign_role", skip=True)
            assert "dave" == match["payload"]["peerId"]
            await dave.expect("assign_role", skip=True)
            await carol.send({"type": "user_available_webrtc"})
            await carol.sync()
            three.kill9()
            await _disconnected(carol)
            await _disconnected(dave)
        killed_at = trio.current_time()
        # Its WebSockets close before Redis sees its subscription go: a thread of the dying
        # process (the subscriber, in select() on that socket) holds the socket until it has
        # exited too, a few ms later under load. The guarantee starts once Redis has seen it.
        await three.process.wait()
        channel = instance_channel(three.instance)
        with redis_client(url) as r:
            gone = await wait_until(lambda: 0 == r.eval(_LISTENERS, 1, POOL, channel), timeout=5)
            assert gone < 0.5, f"Redis kept the dead instance's subscription for {gone:.2f}s"
        # Nobody is matched with a user of the dead instance, not even before it is reaped.
        await bob.request({"type": "request_random_peer"}, "no_peer_available", skip=True)
        with redis_client(url) as r:
            # The reaper clears pool and presence first, then (a second step) the rooms.
            took = await wait_until(
                lambda: not _ghosts(r, doomed) and {b"alice", b"bob"} == r.smembers("room:members:Den"),
                timeout=FAST_BOUND + 5,
            )
            assert took <= FAST_BOUND + 1.0, f"ghosts for {took:.1f}s"
            assert {} == r.hgetall("webrtc:matches:{available:webrtc}")
            assert not r.zscore(INSTANCES_KEY, three.instance)
        # alice's match with dave ended: she is told, from dave.
        hangup = await alice.expect("hangup", skip=True)
        assert ("dave", {"reason": "peer_left"}) == (hangup["fromUser"], hangup["payload"])
        assert trio.current_time() - killed_at <= FAST_BOUND + 2.0
        # The survivors keep working.
        rooms = await alice.request({"type": "get_rooms"}, "rooms_list", skip=True)
        assert ["Den"] == rooms["payload"]["rooms"]
        await bob.send({"type": "chat_message", "room": "Den", "payload": {"content": "still here"}})
        assert "still here" == (await alice.expect("chat_message", skip=True))["payload"]["content"]
        # A restarted instance rejoins: its users are matched and chat with the others.
        async with (
            serve_process("--redis-url", url, *FAST) as again,
            connect(again.port, "carol", "Den", skip=True) as carol,
        ):
            await carol.send({"type": "user_available_webrtc"})
            await carol.sync()
            match = await bob.request({"type": "request_random_peer"}, "assign_role", skip=True)
            assert "carol" == match["payload"]["peerId"]
            assert "bob" == (await carol.expect("assign_role", skip=True))["payload"]["peerId"]
            await carol.send({"type": "chat_message", "room": "Den", "payload": {"content": "back"}})
            assert "back" == (await alice.expect("chat_message", skip=True))["payload"]["content"]
            assert "back" == (await bob.expect("chat_message", skip=True))["payload"]["content"]
            await carol.send({"type": "webrtc_offer", "toUser": "alice", "payload": {"sdp": "x"}})
            assert "carol" == (await alice.expect("webrtc_offer", skip=True))["fromUser"]


@pytest.mark.slow
async def test_kill_9_with_default_timing_is_cleaned_within_15_seconds(redis_server: RedisServer) -> None:
    """With the default presence settings (10 s TTL, 3 s heartbeat) a killed instance's users
    leave pool and presence within 15 s (13 s at most by construction)."""
    url = redis_server.url
    async with serve_process("--redis-url", url) as survivor:
        async with (
            serve_process("--redis-url", url) as doomed,
            connect(doomed.port, "ghost", skip=True) as ghost,
        ):
            await ghost.send({"type": "user_available_webrtc"})
            await ghost.sync()
            doomed.kill9()
            await _disconnected(ghost)
        with redis_client(url) as r:
            took = await wait_until(lambda: not _ghosts(r, {"ghost"}), timeout=20)
        assert took <= 15.0
        health = await get_json(survivor.port, "/health")
        assert "ok" == health["redis"]


_WORKER_READY = re.compile(r"event=worker_ready worker=(\d+) pid=(\d+)")


def _worker_pids(server: ServerProcess) -> dict[int, int]:
    return {int(w): int(pid) for w, pid in _WORKER_READY.findall(server.text())}


async def _instances_seen(port: int, probes: int) -> dict[str, int]:
    """instance id -> its connection count, from ``probes`` /health requests (each on a new
    TCP connection, so SO_REUSEPORT spreads them over the workers)."""
    seen: dict[str, int] = {}
    for _ in range(probes):
        health = await get_json(port, "/health")
        seen[health["instance"]] = health["connections"]
    return seen


async def test_workers_share_the_port_and_a_dead_worker_is_replaced(redis_server: RedisServer) -> None:
    """``--workers 2``: one port, two worker processes that both take connections and behave
    as one server; a worker killed with SIGKILL is replaced; SIGTERM stops all, exit 0."""
    async with serve_process("--redis-url", redis_server.url, "--workers", "2", *FAST) as server:
        pids = _worker_pids(server)
        assert [0, 1] == sorted(pids)
        async with trio.open_nursery() as nursery:
            clients: list[SocketPeer] = []
            all_in = trio.Event()

            async def hold(user: str) -> None:
                async with connect(server.port, user, "Den", skip=True) as client:
                    clients.append(client)
                    if len(clients) == 16:
                        all_in.set()
                    await trio.sleep_forever()

            for n in range(16):
                nursery.start_soon(hold, f"w{n}")
            await all_in.wait()
            seen = await _instances_seen(server.port, 40)
            assert 2 == len(seen), seen
            assert all(count > 0 for count in seen.values()), seen  # both took connections
            assert 16 == sum(seen.values())
            # One server: a room message reaches members on both workers.
            await clients[0].send({"type": "chat_message", "room": "Den", "payload": {"content": "all"}})
            for client in clients:
                assert "all" == (await client.expect("chat_message", skip=True))["payload"]["content"]
            nursery.cancel_scope.cancel()

        os.kill(pids[0], signal.SIGKILL)
        with trio.fail_after(15):
            await server.wait_for_log(lambda _: _worker_pids(server).get(0) != pids[0])
        seen_after = await _instances_seen(server.port, 40)
        assert 2 == len(seen_after), seen_after
        assert 1 == len(set(seen) & set(seen_after))  # one survivor, one new instance
        async with connect(server.port, "late", skip=True) as late:
            await late.sync()
    assert "event=worker_died worker=0" in server.text()
    assert "event=workers_stopped" in server.text()


def test_workers_need_redis(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """More than one worker without Redis is refused with a clear message (exit 2)."""
    for name in ("ALEATORIA_REDIS_URL", "VALKEY_HOST"):
        monkeypatch.delenv(name, raising=False)
    assert 2 == main(["serve", "--workers", "2"])
    error = capsys.readouterr().err
    assert "--workers 2 needs Redis" in error
    assert "ALEATORIA_REDIS_URL" in error


async def test_a_worker_that_cannot_start_stops_the_parent() -> None:
    """A worker that exits before it is ever ready is not restarted: the parent stops at
    once with the worker's status. (The same through ``aleatoria serve``: test_startup.py.)"""

    class Failing(Supervisor):
        def command(self, index: int) -> list[str]:
            return [sys.executable, "-c", "raise SystemExit(3)"]

    supervisor = Failing(Config(workers=2, redis_url="redis://127.0.0.1:1/0"), [], 1)
    with trio.fail_after(10):
        assert 3 == await supervisor.run()
    assert 0 == supervisor.restarts
    assert not supervisor.gave_up


async def test_a_replacement_that_keeps_failing_stops_the_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that was ready and died is restarted; if its replacements die five times in
    a row before they are ready, the parent is not restarting them forever: it stops with
    the worker's status."""

    class ReadyOnce(Supervisor):
        started = 0

        def command(self, index: int) -> list[str]:
            self.started += 1
            ready = "print('ready', flush=True); " if self.started == 1 else ""
            return [sys.executable, "-c", ready + "raise SystemExit(3)"]

    monkeypatch.setattr(aleatoria.workers, "_BACKOFF_FIRST", 0.01)
    supervisor = ReadyOnce(Config(workers=1), [], 1)
    with trio.fail_after(15):
        assert 3 == await supervisor.run()
    assert supervisor.gave_up
    assert 5 == supervisor.restarts
