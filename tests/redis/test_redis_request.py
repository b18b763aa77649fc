"""The writer's hand-packed request (``redis_writer.Request``): what a pipeline guaranteed,
it guarantees too -- commands run in order, replies come back in order and byte-exact, an
error reply fails the request only after every reply was read, so the pooled connection
stays in step for the next one."""

from __future__ import annotations

import pytest
import redis
from redis_server import RedisServer

from aleatoria.store.redis_writer import Request


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
