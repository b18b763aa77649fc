"""Measure what one loopback ``send`` costs the sender: to a reader that sleeps, and in a burst.

A reader process on CPU 1 waits in epoll on 50 TCP connections and drains them; this
process, on CPU 0, sends 200 bytes on each, either one at a time with a pause between
(every send finds the reader asleep and wakes it) or to all 50 back to back (most sends
find it awake). The kernel time of a send that wakes a sleeping reader is what
``aleatoria.flusher`` saves by writing bursts. Linux only.
Usage: python scripts/send_cost.py [rounds]
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import time

CONNECTIONS = 50
MESSAGE = b"x" * 200


def _reader(sockets: list[socket.socket]) -> None:
    os.sched_setaffinity(0, {1})
    poller = select.epoll()
    by_fd = {s.fileno(): s for s in sockets}
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    while True:
        for fd, _ in poller.poll():
            if not by_fd[fd].recv(65536):
                os._exit(0)


def _spin(seconds: float) -> None:
    """Wait without sleeping (a sleep would change this process's own wake-up costs)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="What one loopback send costs the sender: to a sleeping reader, and in a burst."
    )
    parser.add_argument(
        "rounds",
        nargs="?",
        type=int,
        default=200,
        help="bursts to all connections (200); a tenth as many rounds of single sends",
    )
    return parser


def main() -> None:
    parser = _parser()
    rounds = parser.parse_args().rounds
    if rounds < 1:
        parser.error("rounds must be at least 1")
    listener = socket.create_server(("127.0.0.1", 0))
    ours: list[socket.socket] = []
    theirs: list[socket.socket] = []
    for _ in range(CONNECTIONS):
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ours.append(server)
        theirs.append(client)
    reader = os.fork()
    if reader == 0:
        for s in ours:
            s.close()  # or the reader would keep our ends open and never see EOF
        _reader(theirs)
    for s in theirs:
        s.close()
    os.sched_setaffinity(0, {0})
    _spin(0.2)  # let the reader settle into epoll

    spent, sends = 0.0, 0
    for _ in range(max(1, rounds // 10)):
        for s in ours:
            start = time.thread_time()
            s.send(MESSAGE)
            spent += time.thread_time() - start
            sends += 1
            _spin(0.0002)
    asleep = spent / sends

    spent, sends = 0.0, 0
    for _ in range(rounds):
        start = time.thread_time()
        for s in ours:
            s.send(MESSAGE)
        spent += time.thread_time() - start
        sends += CONNECTIONS
        _spin(0.002)
    burst = spent / sends

    for s in ours:
        s.close()
    os.waitpid(reader, 0)
    print(f"send to a sleeping reader:        {asleep * 1e6:6.1f} us of CPU")
    print(f"send in a burst of {CONNECTIONS} connections: {burst * 1e6:6.1f} us of CPU each")


if __name__ == "__main__":
    main()
