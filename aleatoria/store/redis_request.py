"""Commands sent as one request on one of a plain Redis's pooled connections.

What a redis-py pipeline sends, without the pipeline's per-command bookkeeping. Measured
(docs/performance.md, "Session 6" and "Session 11"): the writer's thread spent more on the
pipeline object than on the socket, and then, with the pipeline gone, most of what was
left on redis-py's packer, which checks and encodes every argument in Python before
handing it to hiredis. Our arguments are already bytes, text or numbers, which hiredis's
``pack_command`` takes as they are and packs to the same bytes (``tests/redis/
test_redis_request.py`` holds the two equal): 5.9 -> 0.9 us per room message in a batch
of 50, 16 -> 2.2 us alone. Replies are read through the connection's own
``read_response``, so its parser, error classes and disconnect-on-failure stay redis-py's.
"""

from __future__ import annotations

from typing import Any

import redis
from hiredis import pack_command

Argument = bytes | str | int | float

# Small commands share a buffer up to this size (one system call for a batch of small
# messages); a larger command goes as it is.
_JOIN_BYTES = 65536


class Request:
    """Commands to send as one request (``command`` each, then ``send`` once)."""

    __slots__ = ("_commands",)

    def __init__(self) -> None:
        self._commands: list[tuple[Argument, ...]] = []

    def command(self, *args: Argument) -> None:
        self._commands.append(args)

    def send(self, r: redis.Redis, *, raise_on_error: bool = True) -> list[Any]:
        """Send the request on one of ``r``'s pooled connections and read every reply (runs
        on a worker thread). An error reply is in its place in the list; with
        ``raise_on_error`` the first one is raised instead, as a pipeline does, once every
        reply is read (so the connection stays in step). A connection error is raised (the
        connection is dropped: ``read_response`` disconnects on any other failure)."""
        pool = r.connection_pool
        connection = pool.get_connection()
        try:
            try:
                packed = _buffers(self._commands)
            except TypeError as exc:  # as redis-py's encoder refuses a bool or a None
                raise redis.DataError(f"cannot send {exc}") from exc
            connection.send_packed_command(packed)  # type: ignore[no-untyped-call]
            replies: list[Any] = []
            error: redis.ResponseError | None = None
            for _ in self._commands:
                try:
                    replies.append(connection.read_response())
                except redis.ResponseError as exc:
                    error = error or exc
                    replies.append(exc)
        finally:
            pool.release(connection)
        if error is not None and raise_on_error:
            raise error
        return replies


def _buffers(commands: list[tuple[Argument, ...]]) -> list[bytes]:
    """The packed commands as buffers to send: small commands joined up to ``_JOIN_BYTES``,
    a larger one sent as it is (the cut redis-py's ``pack_commands`` makes, at a larger
    size: redis-py joins up to 6,000 bytes, and a DM batch of ~90 messages then took four
    system calls instead of one). Joining the whole request into one buffer measured
    worse: a batch of 32 KB messages became a copy of many megabytes, and the server's
    resident memory under the history-budget attack grew 31 -> 53-71 MB
    (``tests/scaleout/test_memory_bounds.py``; 31-38 MB with these buffers)."""
    out: list[bytes] = []
    pieces: list[bytes] = []
    size = 0
    for args in commands:
        chunk = pack_command(args)  # type: ignore[arg-type]  # the stub allows one item only
        if len(chunk) > _JOIN_BYTES:
            if pieces:
                out.append(b"".join(pieces))
                pieces, size = [], 0
            out.append(chunk)
            continue
        pieces.append(chunk)
        size += len(chunk)
        if size > _JOIN_BYTES:
            out.append(b"".join(pieces))
            pieces, size = [], 0
    if pieces:
        out.append(b"".join(pieces))
    return out
