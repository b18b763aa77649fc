#!/usr/bin/env python3
"""CPU per WebSocket connect inside one process: the real server (memory store, hub, flusher,
sessions) accepts ``--count`` connections over socket pairs, each sending a handshake for
its own user and one of 100 rooms, and each held open (as ``loadgen conns`` holds them).
Both sides run in this process, so the figure is the server's connect plus a small
client's; compare trees with it, not with the live figures.

For instruction counts (steady on a loaded machine), run it under callgrind at two counts
and divide the difference of the ``Collected`` totals by the difference of the counts;
``--no-teardown`` ends the process without closing the connections, so only connects count:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python scripts/connect_cost.py --count 1000 --no-teardown
    (the same with --count 3000)
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import socket
import sys
import time

import trio

from aleatoria.config import Config
from aleatoria.flusher import open_flusher
from aleatoria.hub import open_hub
from aleatoria.server import Server
from aleatoria.store import open_store

_HEAD = (
    b"GET /ws?userId=u%d&room=idle-%d HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nOrigin: https://www.aleatoria.chat\r\n\r\n"
)
_WARM_UP = 200


async def _connect(server: Server, nursery: trio.Nursery, index: int, held: list[socket.socket]) -> None:
    """One connection, accepted as the listener would, until its ``room_joined`` arrives."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    nursery.start_soon(server._connection, ours, "127.0.0.1", server._count_socket("127.0.0.1"))
    theirs.send(_HEAD % (index, index % 100))
    got = b""
    while b"room_joined" not in got:
        await trio.lowlevel.wait_readable(theirs)
        data = theirs.recv(65536)
        if not data:
            raise SystemExit(f"connection {index} closed: {got!r}")
        got += data
    held.append(theirs)


async def _main(count: int, teardown: bool) -> None:
    config = Config(
        port=0,
        rate_limit=0,
        allowed_origins=("*",),
        max_connections_per_ip=0,
        max_connections=_WARM_UP + count,  # every connection timed gets in
    )
    held: list[socket.socket] = []
    async with (
        open_store(config) as store,
        open_hub(config.room_linger, store.bus) as hub,
        open_flusher() as flusher,
        trio.open_nursery() as nursery,
    ):
        server = Server(config, store, hub, flusher)
        server._tasks = nursery
        for index in range(_WARM_UP):
            await _connect(server, nursery, index, held)
        started = time.process_time()
        for index in range(_WARM_UP, _WARM_UP + count):
            await _connect(server, nursery, index, held)
        spent = time.process_time() - started
        print(f"connect: {spent / count * 1e6:.1f} us CPU per connect (both sides), {count} connects")
        if not teardown:
            sys.stdout.flush()
            os._exit(0)
        nursery.cancel_scope.cancel()
    for sock in held:
        sock.close()


_SPARE_FILES = 64  # the interpreter's, trio's wake-up pipe, the store's


def _allow_files(parser: argparse.ArgumentParser, needed: int) -> None:
    """Raise the open-files limit to ``needed`` (two per connection: a socket pair), or
    refuse before anything runs: the hard limit is the operator's to raise."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        most = (hard - _SPARE_FILES) // 2 - _WARM_UP
        lower = f" or lower --count to {most}" if most >= 1 else ""
        parser.error(
            f"--count needs {needed} open files (two per connection, {_WARM_UP} more connections "
            f"to warm up) and the limit is {hard}: raise it (ulimit -n){lower}"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=3000, help="connections to time (after 200 unmeasured)")
    parser.add_argument(
        "--no-teardown", action="store_true", help="exit without closing them (instruction counts)"
    )
    args = parser.parse_args()
    if args.count < 1:
        parser.error("--count must be at least 1")
    _allow_files(parser, 2 * (_WARM_UP + args.count) + _SPARE_FILES)
    # As ``aleatoria serve`` does after start-up (cli.py).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    trio.run(_main, args.count, not args.no_teardown)


if __name__ == "__main__":
    main()
