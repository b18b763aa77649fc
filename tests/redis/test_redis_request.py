"""The writer's request (``redis_request.Request``): what a pipeline guaranteed,
it guarantees too -- commands run in order, replies come back in order and byte-exact, an
error reply fails the request only after every reply was read, so the pooled connection
stays in step for the next one."""

from __future__ import annotations

import pytest
import redis
import redis.connection
from hypothesis import given, settings
from hypothesis import strategies as st
from redis_server import RedisServer

from aleatoria.store.redis_request import _JOIN_BYTES, Request, _buffers


def test_replies_come_back_in_order_and_byte_exact(redis_server: RedisServer) -> None:
    """Arguments of every kind (bytes with CRLF and non-UTF-8 bytes, text, ints) arrive as
    sent, and each command's reply is in its place."""
    awkward = b"line\r\n$3\r\nfoo\r\n\xff\x00" + "é".encode()
    with redis.Redis.from_url(redis_server.url) as r:
        request = Request()
        request.command("RPUSH", "k", awkward, "text é", 42, -7)
        request.command("LRANGE", "k", 0, -1)
        request.command("PUBLISH", "nobody", b"x")
        assert [4, [awkward, "text é".encode(), b"42", b"-7"], 0] == request.send(r)


def test_an_error_reply_fails_the_request_and_leaves_the_connection_in_step(
    redis_server: RedisServer,
) -> None:
    """A script Redis does not know (NOSCRIPT: it restarted) fails the request, as a
    pipeline's first error did; the commands around it ran (Redis runs the whole request),
    and the next request on the same single pooled connection reads its own replies."""
    with redis.Redis.from_url(redis_server.url, max_connections=1) as r:
        request = Request()
        request.command("SET", "before", 1)
        request.command("EVALSHA", "0" * 40, 0)
        request.command("SET", "after", 2)
        with pytest.raises(redis.exceptions.NoScriptError):
            request.send(r)
        assert [b"1", b"2"] == r.mget("before", "after")
        again = Request()
        again.command("INCR", "before")
        again.command("GET", "after")
        assert [2, b"2"] == again.send(r)


_ARGUMENT = st.one_of(
    st.binary(max_size=64),
    st.integers(20_000, 70_000).map(lambda n: b"\xff" * n),  # around the cut-off for joining buffers
    st.text(max_size=32),
    st.integers(-(2**80), 2**80),
    st.floats(allow_nan=False, allow_infinity=False),
)


_COMMAND = st.tuples(st.sampled_from(["EVALSHA", "PUBLISH", "SPUBLISH"]), st.lists(_ARGUMENT, max_size=8))


@settings(max_examples=300, deadline=None)
@given(st.lists(_COMMAND.map(lambda c: [c[0], *c[1]]), min_size=1, max_size=6))
def test_packed_as_redis_py_packs(commands: list[list[bytes | str | int | float]]) -> None:
    """What ``Request`` sends (hiredis's ``pack_command``) is, byte for byte, what redis-py's
    own packer gives for every command the store sends: a command name, then bytes, text,
    integers and floats; cut into joined buffers under twice ``_JOIN_BYTES``, and a command
    larger than that is a buffer of its own."""
    packer = redis.connection.Connection()  # type: ignore[no-untyped-call]
    expected = packer.pack_commands(commands)  # type: ignore[no-untyped-call]
    buffers = _buffers([tuple(command) for command in commands])
    assert b"".join(expected) == b"".join(buffers)
    sizes = [len(b"".join(packer.pack_commands([c]))) for c in commands]  # type: ignore[no-untyped-call]
    large = {size for size in sizes if size > _JOIN_BYTES}
    # A joined buffer stops once it passes the cut-off: under twice that.
    assert all(len(buffer) in large or len(buffer) < 2 * _JOIN_BYTES for buffer in buffers)


def test_an_argument_redis_py_refuses_is_refused_before_anything_is_sent(
    redis_server: RedisServer,
) -> None:
    """A bool or a None is a bug in the caller: it fails like redis-py's encoder (DataError,
    a RedisError the store handles), and the connection stays usable."""
    with redis.Redis.from_url(redis_server.url, max_connections=1) as r:
        for bad in (True, None):
            request = Request()
            request.command("SET", "k", bad)  # type: ignore[arg-type]
            with pytest.raises(redis.DataError):
                request.send(r)
        ok = Request()
        ok.command("SET", "k", 1)
        assert [b"OK"] == ok.send(r)
