"""Redis' time on room messages (``redis_stamp``), script by script on a real redis-server:
the text it writes is ``codec``'s, a room's times never go back, and a fallback write of a
message the script stored already is skipped."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis_server import RedisServer

from aleatoria.codec import encode_relayed, now, parse_time_ns, rfc3339
from aleatoria.store.redis_bus import PUBLISH, ROUTE, SEND, Outgoing, RedisBus, room_channel
from aleatoria.store.redis_stamp import ROOM_APPEND, ROOM_SEND, STAMP_HELPERS, echo_key, stampable
from aleatoria.store.redis_writer import LiveScripts

_KEY = "room:messages:Den"
_CHANNEL = "aleatoria:room:{room:messages:Den}"
_DAY_MS = 86_400_000
_LAST_US = 2**53 - 1  # in 2255: Lua's doubles hold every microsecond until then


def _message(text: str, created: str | None = None) -> bytes:
    return encode_relayed(
        "chat_message", "ann", None, "Den", {"content": text}, f"id-{text}", created or now()[1]
    )


def _send(r: Any, *messages: bytes) -> int:
    cutoff = time.time_ns() - _DAY_MS * 1_000_000
    reached: int = r.register_script(ROOM_SEND)(
        keys=[_KEY], args=[_CHANNEL, "PUBLISH", cutoff, 1000, _DAY_MS, *messages]
    )
    return reached


def _stored(r: Any) -> list[tuple[dict[str, Any], int]]:
    return [(orjson.loads(m), int(score)) for m, score in r.zrange(_KEY, 0, -1, withscores=True)]


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[Any]:
    with redis_server.client() as r:
        yield r


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(min_value=0, max_value=_LAST_US))
@example(0)
@example(_LAST_US)
@example(951_782_400_000_000)  # 2000-02-29 (a leap day of a century divisible by 400)
@example(4_107_542_399_999_999)  # 2100-02-28T23:59:59.999999 (2100 is no leap year)
@example(1_767_225_599_999_999)  # 2025-12-31T23:59:59.999999
def test_the_script_writes_the_codec_form(client: Any, us: int) -> None:
    text = client.eval(STAMP_HELPERS + "return rfc3339(tonumber(ARGV[1]))", 0, us)
    assert rfc3339(us * 1000) == text.decode()


def test_a_room_message_takes_redis_time_never_before_the_newest(client: Any) -> None:
    before = time.time_ns()
    _send(client, _message("first", "1999-01-01T00:00:00.000000Z"))
    ((first, score),) = _stored(client)
    created = parse_time_ns(first["createTime"])
    assert before - 1_000_000_000 < created < time.time_ns() + 1_000_000_000  # Redis' clock, not 1999
    assert abs(score - created) < 1000 and {"content": "first"} == first["payload"]

    # A newer message already stored (another clock ahead): the next one comes 1 µs after it.
    ahead = created + 3_600_000_000_000
    client.zadd(_KEY, {_message("ahead", rfc3339(ahead)): ahead})
    _send(client, _message("next"))
    stored = _stored(client)
    assert ["first", "ahead", "next"] == [m["payload"]["content"] for m, _ in stored]
    assert ahead + 1000 == parse_time_ns(stored[-1][0]["createTime"])
    times = [m["createTime"] for m, _ in stored]
    assert sorted(set(times)) == times


def test_many_messages_in_one_microsecond_get_distinct_increasing_times(client: Any) -> None:
    for n in range(200):
        _send(client, _message(str(n)))
    stored = _stored(client)
    assert [str(n) for n in range(200)] == [m["payload"]["content"] for m, _ in stored]
    times = [m["createTime"] for m, _ in stored]
    assert sorted(set(times)) == times
    assert all(abs(parse_time_ns(t) - score) < 1000 for t, (_, score) in zip(times, stored, strict=True))


def test_each_is_published_as_stored_in_order_one_microsecond_apart(client: Any) -> None:
    pubsub = client.pubsub()
    pubsub.subscribe(_CHANNEL)
    assert "subscribe" == pubsub.get_message(timeout=5)["type"]
    assert 1 == _send(client, _message("hello"))
    assert 1 == _send(client, _message("a"), _message("b"), _message("c"))  # one pipeline's
    published = [pubsub.get_message(timeout=5)["data"] for _ in range(4)]
    stored = client.zrange(_KEY, 0, -1)
    assert stored == published
    assert ["hello", "a", "b", "c"] == [orjson.loads(m)["payload"]["content"] for m in stored]
    times = [parse_time_ns(orjson.loads(m)["createTime"]) for m in stored[1:]]
    assert [times[0], times[0] + 1000, times[0] + 2000] == times
    pubsub.close()


async def test_a_pipelines_room_messages_share_a_call_and_events_keep_their_place() -> None:
    """The bus sends a room's messages of one pipeline in one ``room_send`` call, up to an
    event published on that room's channel: messages after the event stay after it."""
    bus = object.__new__(RedisBus)
    bus._publish_command = "PUBLISH"
    commands: list[tuple[Any, ...]] = []
    items = [
        Outgoing(SEND, "A", b"a1"),
        Outgoing(SEND, "B", b"b1"),
        Outgoing(SEND, "A", b"a2"),
        Outgoing(PUBLISH, room_channel("A"), b"2Mjoined ann"),
        Outgoing(SEND, "A", b"a3"),
        Outgoing(ROUTE, "bob", b"frame"),
        Outgoing(SEND, "B", b"b2"),
    ]
    scripts = LiveScripts("route", "send", 1, 1000, 60_000)
    slots = bus.add_to_pipeline(lambda *args: commands.append(args), items, scripts)
    assert [0, 1, 0, 2, 3, 4, 1] == slots
    sends = [(c[3], c[9:]) for c in commands if c[:2] == ("EVALSHA", "send")]
    assert [
        ("room:messages:A", (b"a1", b"a2")),
        ("room:messages:B", (b"b1", b"b2")),
        ("room:messages:A", (b"a3",)),
    ] == sends
    assert ("PUBLISH", room_channel("A"), b"2Mjoined ann") == commands[2]
    assert ("EVALSHA", "route") == commands[4][:2]


def test_a_fallback_write_of_a_stored_message_is_skipped(client: Any) -> None:
    """The bus gave up on a message whose script ran after all: the instance writes its own
    copy (its own time) to history, and ``room_append`` keeps just one."""
    mine = _message("once")
    _send(client, mine)
    ((theirs, _),) = client.zrange(_KEY, 0, -1, withscores=True)
    assert theirs != mine and echo_key(theirs) == echo_key(mine)
    append = client.register_script(ROOM_APPEND)
    created_ns = parse_time_ns(orjson.loads(mine)["createTime"])
    other = _message("other")
    other_ns = parse_time_ns(orjson.loads(other)["createTime"])
    cutoff = time.time_ns() - _DAY_MS * 1_000_000
    append(keys=[_KEY], args=[cutoff, 1000, _DAY_MS, created_ns, mine, other_ns, other])
    append(keys=[_KEY], args=[cutoff, 1000, _DAY_MS, other_ns, other])  # a retried batch
    assert [theirs, other] == client.zrange(_KEY, 0, -1)


def test_a_fallback_write_skips_a_copy_a_hung_redis_stored_long_after(client: Any) -> None:
    """Redis hung for longer than the window (9 s) and ran the script when it resumed, with
    its time then: the instance's fallback copy of the message, with its own earlier time,
    is skipped all the same."""
    created_ns = time.time_ns() - 9_000_000_000
    mine = _message("late", rfc3339(created_ns))
    _send(client, mine)
    ((theirs, score),) = client.zrange(_KEY, 0, -1, withscores=True)
    assert score - created_ns > 8_000_000_000
    cutoff = time.time_ns() - _DAY_MS * 1_000_000
    created_ns = parse_time_ns(orjson.loads(mine)["createTime"])
    client.register_script(ROOM_APPEND)(keys=[_KEY], args=[cutoff, 1000, _DAY_MS, created_ns, mine])
    assert [theirs] == client.zrange(_KEY, 0, -1)


def test_only_messages_ending_with_a_codec_time_are_stamped() -> None:
    assert stampable(_message("x"))
    assert not stampable(_message("x", "2025-11-24T16:00:00Z"))  # another form of time
    assert not stampable(b'{"type":"x"}')
    assert not stampable(b"2Mjoined ann")
