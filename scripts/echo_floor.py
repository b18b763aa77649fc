"""Measure this machine's floor for a trio server: server CPU per echoed message.

A bare trio echo server over raw non-blocking sockets (no WebSocket, no JSON) in one
process pinned to CPU 0; a selector-based client in another process on CPU 1 keeps 50
connections ping-ponging for a few seconds. Whatever Aleatoria spends per message beyond
this figure is its own work. Usage: python scripts/echo_floor.py [seconds]
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import socket
import time

import trio

PAIRS = 50
MESSAGE = b"x" * 150


def _server(port_pipe: int) -> None:
    os.sched_setaffinity(0, {0})
    handled = 0

    async def handle(sock: socket.socket) -> None:
        nonlocal handled
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            sock.send(data)
            handled += 1

    async def main() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        os.write(port_pipe, str(listener.getsockname()[1]).encode().ljust(8))
        async with trio.open_nursery() as nursery:
            for _ in range(PAIRS):
                await trio.lowlevel.wait_readable(listener)
                sock, _ = listener.accept()
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nursery.start_soon(handle, sock)
        listener.close()

    trio.run(main)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    print(
        f"server: {handled} messages, {cpu / handled * 1e6:.1f} us CPU per message "
        f"({usage.ru_utime / handled * 1e6:.1f} user, {usage.ru_stime / handled * 1e6:.1f} kernel)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="This machine's floor for a trio server: server CPU per message of a bare echo."
    )
    parser.add_argument(
        "seconds", nargs="?", type=float, default=5.0, help="how long the clients ping-pong (5)"
    )
    return parser


def main() -> None:
    parser = _parser()
    seconds = parser.parse_args().seconds
    if not seconds > 0:
        parser.error("seconds must be positive")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        _server(write_end)
        os._exit(0)
    port = int(os.read(read_end, 8))
    os.sched_setaffinity(0, {1})
    selector = selectors.DefaultSelector()
    clients = []
    for _ in range(PAIRS):
        client = socket.create_connection(("127.0.0.1", port))
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.setblocking(False)
        selector.register(client, selectors.EVENT_READ)
        clients.append(client)
        client.send(MESSAGE)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock.recv(65536):
                sock.send(MESSAGE)
    for client in clients:
        client.close()
    os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
