"""In Redis mode the server keeps no second copy of what Redis holds (PROTOCOL.md section
16): while Redis is healthy history goes only to the bounded write buffer, and memory holds
history only while Redis is failing (reads are served from it then)."""

from __future__ import annotations

import time

import orjson
import trio
from redis_server import RedisServer
from redis_support import server_config, wait_until
from support import connect, running_server
from test_redis_metrics import scrape

from aleatoria.store.redis import RedisStore, open_redis_store

ROOMS = [f"r{i}" for i in range(60)]
PAIRS = [(f"u{i}", f"v{i}") for i in range(60)]
ROUNDS = 15
BUFFER = 500


def _message(n: int, created_ns: int, **fields: str) -> bytes:
    seconds, rest = divmod(created_ns, 10**9)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest // 1000:06d}Z"
    body = {"type": "chat_message", "fromUser": "a", "payload": {"content": str(n)}, "createTime": stamp}
    return orjson.dumps(body | fields)


def _memory_history(store: RedisStore) -> int:
    """Messages of ROOMS and PAIRS that the store holds in memory: in its mirror, and in its
    outage history (only while degraded)."""
    held = 0
    for memory in (store._memory, store.keeper.outage):
        if memory is not None:
            held += sum(len(memory.recent_room_messages_now(room, 10_000)) for room in ROOMS)
            held += sum(len(memory.direct_messages_now(a, b, 10_000)) for a, b in PAIRS)
    return held


class Acks:
    """Counts ``on_stored`` calls; ``wait_for(n)`` returns once there were ``n``."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = trio.Event()

    def __call__(self) -> None:
        self.count += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        with trio.fail_after(10):
            while self.count < count:
                await self._changed.wait()


async def _rounds(store: RedisStore, acks: Acks, first: int, rounds: int) -> None:
    """``rounds`` messages into every room and every DM; after each round, wait until Redis
    has the round's DMs (their ``on_stored``; the room messages were queued before them)."""
    for n in range(first, first + rounds):
        created = time.time_ns()
        for room in ROOMS:
            store.record_room_message(room, _message(n, created, room=room), created)
        for a, b in PAIRS:
            store.record_direct_message(a, b, _message(n, created, toUser=b), created, acks)
        assert len(store._writer) <= BUFFER + len(ROOMS) + len(PAIRS)
        assert None is store.keeper.outage
        assert 0 == _memory_history(store)
        await acks.wait_for((n + 1) * len(PAIRS))


async def test_no_history_in_memory_while_redis_is_healthy(redis_server: RedisServer) -> None:
    """Many messages into many rooms and DMs while Redis is healthy: the in-memory mirror
    holds none of them, the write buffer stays within its bound and drains to empty, each
    DM's ``on_stored`` comes once Redis has it, and reads serve everything from Redis."""
    config = server_config(redis_server.url, redis_write_buffer=BUFFER)
    async with open_redis_store(config, redis_server.url) as store:
        assert "ok" == store.health()
        acks = Acks()
        await _rounds(store, acks, 0, ROUNDS)
        assert 0 == store.metrics().dropped
        assert ROUNDS * len(PAIRS) == acks.count
        await wait_until(lambda: 0 == len(store._writer))
        assert 0 == store.gauges()["aleatoria_history_memory_bytes"][1]
        with redis_server.client() as r:
            assert all(ROUNDS == r.zcard(f"room:messages:{room}") for room in ROOMS)
            assert all(ROUNDS == r.llen(f"dm:{a}:{b}") for a, b in PAIRS)
        assert ROUNDS == len(await store.recent_room_messages(ROOMS[7], 100))
        assert ROUNDS == len(await store.direct_messages(*PAIRS[7], 100))
        assert 0 == _memory_history(store)


async def test_history_in_memory_only_while_degraded(redis_server: RedisServer) -> None:
    """Redis dies: from then on messages go to memory too (and are served from there,
    acknowledged at once); what Redis held before is not copied back into memory. Once
    Redis is back the messages of the outage are written to it and memory holds no history
    any more."""
    config = server_config(redis_server.url, redis_write_buffer=BUFFER)
    async with open_redis_store(config, redis_server.url) as store:
        acks = Acks()
        await _rounds(store, acks, 0, 3)
        await wait_until(lambda: 0 == len(store._writer))
        redis_server.kill9()
        # The first read fails: the store degrades and serves from memory, which holds
        # only what Redis has not confirmed (nothing: all was written).
        assert [] == await store.recent_room_messages(ROOMS[0], 100)
        assert "degraded" == store.health()
        created = time.time_ns()
        for room in ROOMS:
            store.record_room_message(room, _message(3, created, room=room), created)
        for a, b in PAIRS:
            store.record_direct_message(a, b, _message(3, created, toUser=b), created, acks)
        assert 4 * len(PAIRS) == acks.count  # at once while degraded
        assert len(ROOMS) + len(PAIRS) == _memory_history(store)
        assert [b"3"] == [_content(m) for m in await store.recent_room_messages(ROOMS[0], 100)]
        assert [b"3"] == [_content(m) for m in await store.direct_messages(*PAIRS[0], 100)]
        assert store.gauges()["aleatoria_history_memory_bytes"][1] > 0
        await redis_server.restart()
        await wait_until(lambda: "ok" == store.health(), timeout=20)
        assert None is store.keeper.outage
        assert 0 == store.gauges()["aleatoria_history_memory_bytes"][1]
        with redis_server.client() as r:  # restarted empty: just what the outage took
            assert all(1 == r.zcard(f"room:messages:{room}") for room in ROOMS)
            assert all(1 == r.llen(f"dm:{a}:{b}") for a, b in PAIRS)
        assert [b"3"] == [_content(m) for m in await store.recent_room_messages(ROOMS[0], 100)]


async def test_server_holds_no_history_in_memory_in_redis_mode(redis_server: RedisServer) -> None:
    """A real server in Redis mode, clients chatting in many rooms and DMs: /metrics shows no
    history bytes in memory and a write queue within its bound, and history reads serve
    every message (from Redis)."""
    rooms = [f"room{i}" for i in range(20)]
    async with (
        running_server(server_config(redis_server.url, frame_rate=0, redis_write_buffer=BUFFER)) as srv,
        connect(srv, "alice", skip=True) as alice,
        connect(srv, "bob", skip=True) as bob,
    ):
        for room in rooms:
            await alice.request({"type": "join_room", "room": room}, "room_joined", skip=True)
        for n in range(10):
            for room in rooms:
                await alice.send(
                    {"type": "chat_message", "room": room, "payload": {"content": f"{room}:{n}"}}
                )
            await alice.send({"type": "chat_message", "toUser": "bob", "payload": {"content": f"dm:{n}"}})
        for n in range(10):
            message = await bob.expect("chat_message", skip=True)
            assert f"dm:{n}" == message["payload"]["content"]
        await alice.sync()
        metrics = await scrape(srv.port)
        assert 0 == metrics["aleatoria_history_memory_bytes"]
        assert metrics["aleatoria_redis_write_queue"] <= BUFFER
        for room in rooms:
            recent = await alice.request(
                {"type": "get_recent_messages", "room": room}, "recent_messages", skip=True
            )
            assert 10 == len(recent["payload"]["messages"])
        direct = await bob.request(
            {"type": "get_direct_messages", "payload": {"withUser": "alice"}}, "direct_messages", skip=True
        )
        assert 10 == len(direct["payload"]["messages"])


def _content(message: bytes) -> bytes:
    content: str = orjson.loads(message)["payload"]["content"]
    return content.encode()
