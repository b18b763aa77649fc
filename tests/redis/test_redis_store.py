"""The RedisStore on its own: reads see the write-behind queue, the bounded buffer, order of
the flush after an outage, and the timestamp parsing shared with the original's data."""

from __future__ import annotations

import itertools
import logging
import time
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_server import RedisServer
from redis_support import server_config, wait_until

from aleatoria.codec import parse_time_ns
from aleatoria.core import _within
from aleatoria.store.memory import MemoryStore
from aleatoria.store.redis import open_redis_store
from aleatoria.store.redis_history import created_ns_of, merge_dm


def _message(n: int, created_ns: int, **fields: str) -> bytes:
    seconds, rest = divmod(created_ns, 10**9)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest // 1000:06d}Z"
    body = {"type": "chat_message", "fromUser": "a", "payload": {"content": str(n)}, "createTime": stamp}
    return orjson.dumps(body | fields)


async def test_reads_see_messages_still_queued(redis_server: RedisServer) -> None:
    """A message is readable the moment it was recorded, before the writer wrote it: the
    read merges the queue with what Redis holds (room and DM, limit and before)."""
    async with open_redis_store(server_config(redis_server.url), redis_server.url) as store:
        base = time.time_ns()
        for n in range(3):
            store.record_room_message("Den", _message(n, base + n * 1000, room="Den"), base + n * 1000)
        with redis_server.client() as r:
            await wait_until(lambda: r.zcard("room:messages:Den") == 3)
        async with store._writer.lock:  # hold the writer: what follows stays queued
            for n in range(3, 6):
                created = base + n * 1000
                store.record_room_message("Den", _message(n, created, room="Den"), created)
                store.record_direct_message("b", "a", _message(n, created, toUser="b"), created)
            assert 6 == len(store._writer)
            recent = await store.recent_room_messages("Den", 4)
            assert [b"5", b"4", b"3", b"2"] == [_content(m) for m in recent]
            older = await store.recent_room_messages("Den", 10, before_ns=base + 4 * 1000)
            assert [b"3", b"2", b"1", b"0"] == [_content(m) for m in older]
            direct = await store.direct_messages("a", "b", 2)
            assert [b"4", b"5"] == [_content(m) for m in direct]
        with redis_server.client() as r:
            await wait_until(lambda: r.zcard("room:messages:Den") == 6 and r.llen("dm:a:b") == 3)


async def test_after_stored_waits_until_redis_has_everything_recorded_before(
    redis_server: RedisServer,
) -> None:
    """``after_stored`` (a room message's sender's copy when the bus fell back) is called at
    once when nothing is queued, and otherwise only once the pipeline holding every message
    recorded before it succeeded: when it runs, Redis has them."""
    async with open_redis_store(server_config(redis_server.url), redis_server.url) as store:
        called: list[str] = []
        store.after_stored(lambda: called.append("at once"))
        assert ["at once"] == called
        base = time.time_ns()
        stored = trio.Event()
        with redis_server.client() as r:

            def check() -> None:
                called.append(f"{r.zcard('room:messages:Den')} in Redis")
                stored.set()

            async with store._writer.lock:  # hold the writer: what follows stays queued
                for n in range(3):
                    created = base + n * 1000
                    store.record_room_message("Den", _message(n, created, room="Den"), created)
                store.after_stored(check)
                await trio.testing.wait_all_tasks_blocked()
                assert ["at once"] == called
            with trio.fail_after(10):
                await stored.wait()
        assert ["at once", "3 in Redis"] == called


async def test_after_stored_is_called_when_the_store_degrades(redis_server: RedisServer) -> None:
    """A sender waiting for Redis is not kept waiting by an outage: degraded mode serves from
    memory and writes later, so a pending ``after_stored`` is called when Redis fails."""
    async with open_redis_store(server_config(redis_server.url), redis_server.url) as store:
        called = trio.Event()
        async with store._writer.lock:
            created = time.time_ns()
            store.record_room_message("Den", _message(0, created, room="Den"), created)
            store.after_stored(called.set)
            redis_server.kill9()
        with trio.fail_after(10):
            await called.wait()
        assert "degraded" == store.health()


async def test_after_stored_is_immediate_while_degraded(redis_down: RedisServer) -> None:
    """While Redis is down the store serves from memory: ``after_stored`` does not wait."""
    async with open_redis_store(server_config(redis_down.url), redis_down.url) as store:
        assert "degraded" == store.health()
        created = time.time_ns()
        store.record_room_message("Den", _message(0, created, room="Den"), created)
        called: list[bool] = []
        store.after_stored(lambda: called.append(True))
        assert [True] == called


async def test_buffer_is_bounded_drops_are_counted_and_logged_once(
    redis_down: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """While Redis is down the buffer keeps the newest ``redis_write_buffer`` messages (the
    oldest dropped, counted, one warning); on recovery they are written in order."""
    caplog.set_level(logging.INFO, logger="aleatoria")
    config = server_config(redis_down.url, redis_write_buffer=5)
    async with open_redis_store(config, redis_down.url) as store:
        assert "degraded" == store.health()
        base = time.time_ns()
        for n in range(12):
            created = base + n * 1000
            store.record_direct_message("a", "b", _message(n, created, toUser="b"), created)
        assert 7 == store.metrics().dropped
        assert 5 == store.metrics().queued
        # Served from memory meanwhile (the memory mirror keeps everything within the cap).
        assert 12 == len(await store.direct_messages("a", "b", 50))
        await redis_down.restart()
        with redis_down.client() as r:
            await wait_until(lambda: store.health() == "ok")
            assert [str(n).encode() for n in range(7, 12)] == [_content(m) for m in r.lrange("dm:a:b", 0, -1)]
    full = [rec for rec in caplog.records if "event=redis_buffer_full" in rec.getMessage()]
    assert 1 == len(full)


def test_created_ns_of_reads_both_formats() -> None:
    """createTime with microseconds (ours) or nanoseconds and offsets (the original's)."""
    assert 1_700_000_000_123_456_000 == created_ns_of(b'{"createTime":"2023-11-14T22:13:20.123456Z"}')
    assert 1_700_000_000_123_456_000 == created_ns_of(b'{"createTime":"2023-11-15T00:13:20.123456789+02:00"}')
    assert 1_700_000_000_000_000_000 == created_ns_of(b'{"createTime":"2023-11-14T22:13:20Z"}')
    assert None is created_ns_of(b'{"createTime":"yesterday"}')
    assert None is created_ns_of(b"[1, 2]")
    assert None is created_ns_of(b"not json")


def _content(message: bytes) -> bytes:
    content: str = orjson.loads(message)["payload"]["content"]
    return content.encode()


async def test_open_store_picks_redis_from_the_valkey_settings(redis_server: RedisServer) -> None:
    """VALKEY_HOST/VALKEY_PORT/REDIS_DB (the original's settings) select the Redis store;
    without them the memory store is used."""
    from aleatoria.config import Config, from_environment
    from aleatoria.store import open_store

    environ = {"VALKEY_HOST": "127.0.0.1", "VALKEY_PORT": str(redis_server.port), "REDIS_DB": "2"}
    config = from_environment(environ, port=0)
    async with open_store(config) as store:
        assert ("redis", "ok") == (store.kind, store.health())
        await store.join_room("Den", "alice")
        with redis_server.client(db=2) as r:
            assert {b"alice"} == r.smembers("room:members:Den")
    async with open_store(Config(port=0)) as store:
        assert ("memory", "disabled") == (store.kind, store.health())


def test_a_retried_batch_never_duplicates_a_dm(redis_server: RedisServer) -> None:
    """A batch that failed after Redis ran it is written again as "suspect": room writes
    are idempotent, and DM entries already in the list are skipped, order kept."""
    from aleatoria.store.redis_client import RedisClient
    from aleatoria.store.redis_writer import DM, ROOM, Entry, WriteBehind

    client = RedisClient(redis_server.url, connect_timeout=2, call_timeout=2)
    try:
        client.scripts.load(client.redis)
        writer = WriteBehind(
            capacity=100, batch=100, ttl_ns=3600 * 10**9, history_max=50, scripts=client.scripts
        )
        base = time.time_ns()
        first: list[Entry] = [
            (DM, "a:b", _message(n, base + n, toUser="b"), base + n, None) for n in range(3)
        ]
        first.append((ROOM, "Den", _message(9, base + 9, room="Den"), base + 9, None))
        writer._write(client.redis, batch=first, suspects=0)
        later: list[Entry] = [
            (DM, "a:b", _message(n, base + n, toUser="b"), base + n, None) for n in range(3, 5)
        ]
        writer._write(client.redis, batch=first + later, suspects=len(first))
        with redis_server.client() as r:
            assert [str(n).encode() for n in range(5)] == [_content(m) for m in r.lrange("dm:a:b", 0, -1)]
            assert 1 == r.zcard("room:messages:Den")
    finally:
        client.close()


_TTL_NS = 3600 * 10**9
# A cutoff between two microseconds: one of ours at its microsecond is older, the next newer.
_CUTOFF_NS = 1_790_000_000_123_456_500


def _stamp(created_ns: int, kind: str) -> str:
    """``created_ns`` as ``kind`` writes createTime: ours (UTC, microseconds), the original's
    (Go's RFC3339Nano: nanoseconds, in UTC or at an offset), or text that is no time."""
    if kind == "garbage":
        return "yesterday"
    moment = datetime.fromtimestamp(created_ns // 10**9, UTC)
    if kind == "go_offset":
        moment = moment.astimezone(timezone(timedelta(hours=-5, minutes=-30)))
    fraction = created_ns % 10**9
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if kind == "ours":
        return f"{text}.{fraction // 1000:06d}Z"
    offset = moment.strftime("%z")
    return f"{text}.{fraction:09d}" + ("Z" if offset == "+0000" else f"{offset[:3]}:{offset[3:]}")


_HEAD = st.one_of(
    # Ours, down to a microsecond either side of the cutoff.
    st.tuples(st.just("ours"), st.integers(-3_000_000, 3_000_000).map(lambda us: us * 1000 - 500)),
    # The original's and unparsable ones: at least a millisecond away (parsed as floats).
    st.tuples(
        st.sampled_from(["go_utc", "go_offset", "garbage"]),
        st.integers(-3_000, 3_000).filter(lambda ms: ms != 0).map(lambda ms: ms * 10**6),
    ),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(heads=st.lists(_HEAD, max_size=6))
def test_a_dm_write_trims_exactly_the_expired_head(
    redis_server: RedisServer, heads: list[tuple[str, int]]
) -> None:
    """``dm_append`` pops the list's head while its createTime is at or before the cutoff,
    whichever form the time is in (ours is compared as text, the original's parsed), and
    stops at the first newer or unparsable one; then the new message is last."""
    from aleatoria.store.redis_client import RedisClient
    from aleatoria.store.redis_writer import DM, WriteBehind

    stored = [
        orjson.dumps({"payload": {"content": str(n)}, "createTime": _stamp(_CUTOFF_NS + delta, kind)})
        for n, (kind, delta) in enumerate(heads)
    ]
    expired = 0
    for kind, delta in heads:
        if kind == "garbage" or delta > 0:
            break
        expired += 1
    client = RedisClient(redis_server.url, connect_timeout=2, call_timeout=2)
    try:
        client.scripts.load(client.redis)
        writer = WriteBehind(
            capacity=10,
            batch=10,
            ttl_ns=_TTL_NS,
            history_max=50,
            scripts=client.scripts,
            clock_ns=lambda: _CUTOFF_NS + _TTL_NS,
        )
        with redis_server.client() as r:
            r.delete("dm:a:b")
            if stored:
                r.rpush("dm:a:b", *stored)
            new = _message(99, _CUTOFF_NS + 10**9, toUser="b")
            writer._write(client.redis, batch=[(DM, "a:b", new, _CUTOFF_NS + 10**9, None)], suspects=0)
            assert [*stored[expired:], new] == r.lrange("dm:a:b", 0, -1)
            assert 0 < r.pttl("dm:a:b")
    finally:
        client.close()


def _sized(n: int, created_ns: int, size: int, **fields: str) -> bytes:
    """Message ``n`` with ``size`` more bytes of content, stamped as the server stamps it."""
    seconds, rest = divmod(created_ns, 10**9)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest // 1000:06d}Z"
    body = {"type": "chat_message", "fromUser": "a", "payload": {"content": f"{n} {'x' * size}"}}
    return orjson.dumps(body | fields | {"createTime": stamp})


def _cut(stored: list[bytes], budget: int, from_start: bool) -> list[bytes]:
    """What a reply keeps of ``stored`` (the core's cut)."""
    return [orjson.dumps(kept) for kept in _within(stored, budget, from_start)]


def _size(messages: list[bytes]) -> int:
    """Bytes as the cut counts them: each message and a comma."""
    return sum(len(message) + 1 for message in messages)


def _largest(messages: list[bytes]) -> int:
    return max((len(message) + 1 for message in messages), default=0)


_RUNS = itertools.count()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    # Microseconds between messages (1: within the scores' slack, decided by createTime), the
    # nanoseconds past each one's microsecond (under 500: scores, doubles exact to 256 ns, stay
    # apart; equal ones are ordered by member in Redis, by arrival in memory), and each one's size.
    messages=st.lists(
        st.tuples(st.sampled_from([1, 1, 2, 5, 1000]), st.integers(0, 499), st.integers(0, 3000)),
        min_size=1,
        max_size=40,
    ),
    budget=st.integers(100, 12_000),
    limit=st.integers(1, 30),
    queued=st.integers(0, 4),
)
async def test_byte_bounded_pages_are_the_memory_stores_and_gapless(
    redis_server: RedisServer, messages: list[tuple[int, int, int]], budget: int, limit: int, queued: int
) -> None:
    """Paging a room with ``before`` and with ``after``, each reply cut to ``budget`` bytes,
    gives the same pages on Redis as in memory: every message once, none skipped, whatever
    their sizes, with the newest ``queued`` still in the writer's queue. A DM reply too. And
    what Redis sends fits in the budget but for one message (and for those scored within a
    microsecond or so of the cursor, which their createTime decides); what the memory store
    answers, but for one message."""
    run = next(_RUNS)  # the examples share one redis-server
    room, a, b = f"Den{run}", f"a{run}", f"b{run}"
    config = server_config(redis_server.url)
    memory = MemoryStore(ttl_seconds=config.message_ttl_seconds, history_max=config.history_max)
    # From a whole 10**12 ns (1000 s) in the past: each run rounds the scores alike.
    stamps, at_us = [], (time.time_ns() // 10**12 - 1) * 10**9
    for gap_us, extra_ns, _ in messages:
        at_us += gap_us
        stamps.append(at_us * 1000 + extra_ns)
    rooms = [_sized(n, stamps[n], size, room=room) for n, (_, _, size) in enumerate(messages)]
    dms = [_sized(n, stamps[n], size, toUser=b) for n, (_, _, size) in enumerate(messages)]
    for n in range(len(messages)):
        memory.record_room_message(room, rooms[n], stamps[n])
        memory.record_direct_message(a, b, dms[n], stamps[n])
    written = max(0, len(messages) - queued)
    still_queued = {*rooms[written:], *dms[written:]}
    stamp = dict(zip(rooms, stamps, strict=True))
    async with open_redis_store(config, redis_server.url) as store:
        for n in range(written):
            store.record_room_message(room, rooms[n], stamps[n])
            store.record_direct_message(a, b, dms[n], stamps[n])
        with redis_server.client() as r:
            await wait_until(lambda: r.zcard(f"room:messages:{room}") == r.llen(f"dm:{a}:{b}") == written)
        async with store._writer.lock:  # hold the writer: the newest stay queued
            for n in range(written, len(messages)):
                store.record_room_message(room, rooms[n], stamps[n])
                store.record_direct_message(a, b, dms[n], stamps[n])

            async def page(before_ns: int | None, after_ns: int | None) -> list[bytes]:
                on_redis = await store.recent_room_messages(room, limit, before_ns, after_ns, budget)
                kept = _cut(on_redis, budget, from_start=True)
                in_memory = await memory.recent_room_messages(room, limit, before_ns, after_ns, budget)
                assert _cut(in_memory, budget, from_start=True) == kept
                # The memory store stops as Redis' read does: after the first message past the
                # budget (a report's evidence parses all it is given).
                assert _size(in_memory[:-1]) <= budget
                # What Redis sent fits in the budget but for its last row, and for rows
                # scored within the slack of the cursor (read, not counted: each one's
                # createTime decides whether it is in the page).
                from_redis = [message for message in on_redis if message not in still_queued]
                cursor_ns = before_ns if after_ns is None else after_ns
                near = [m for m in from_redis if cursor_ns is not None and abs(stamp[m] - cursor_ns) <= 3000]
                assert _size(from_redis) <= budget + _largest(from_redis) + _size(near)
                return kept

            def cursor(message: bytes) -> int:
                return parse_time_ns(orjson.loads(message)["createTime"])

            backward: list[bytes] = []
            while got := await page(cursor(backward[-1]) if backward else None, None):
                backward += got
            assert rooms[::-1] == backward
            forward: list[bytes] = []
            while got := await page(None, cursor(forward[-1]) if forward else 0):
                forward += got
            assert rooms == forward

            on_redis = await store.direct_messages(a, b, limit, budget)
            kept = _cut(on_redis, budget, from_start=False)
            assert _cut(await memory.direct_messages(a, b, limit), budget, from_start=False) == kept
            assert dms[-len(kept) :] == kept
            from_redis = [message for message in on_redis if message not in still_queued]
            assert _size(from_redis) <= budget + _largest(from_redis)


def test_a_dm_merge_adds_no_queued_message_redis_holds_beyond_a_short_read() -> None:
    """The writer writes a conversation in order: queued messages Redis already holds are
    the first queued ones. When a byte-bounded read brought only the newest of them, the
    older ones are not added again (as newest)."""
    created = [1_790_000_000_000_000_000 + n * 1000 for n in range(7)]
    stored = [_message(n, created[n], toUser="b") for n in range(7)]
    queued = [(created[n], stored[n]) for n in range(3, 7)]  # 3, 4, 5 written, 6 not yet
    rows = [stored[5], stored[4]]  # newest first: the read stopped at its byte budget
    assert [stored[4], stored[5], stored[6]] == merge_dm(rows, queued, 10, 0)
    assert [stored[5], stored[6]] == merge_dm(rows, queued, 2, 0)
    assert [stored[4], stored[5]] == merge_dm(rows, [], 10, 0)
    assert stored == merge_dm(stored[2::-1], queued, 10, 0)  # none written: all added
