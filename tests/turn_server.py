"""A real coturn ``turnserver`` on free loopback ports, for tests/test_turn.py and the browser
calls through TURN (tests/browser). ``scripts/install-coturn.sh`` installs Debian's coturn.

It runs with the TURN REST options docs/turn.md describes (``use-auth-secret``,
``static-auth-secret``, a realm) plus what only a test on one machine needs: it listens and
relays on 127.0.0.1 and lets loopback peers through (``allow-loopback-peers``; never in
production), with no TLS, no CLI and its database in the test's directory. Its log goes to a
pipe that a thread reads, so the fixture waits for "UDP listener opened" instead of polling.
Under CI (``CI`` set) a missing turnserver fails the run instead of skipping.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

START_SECONDS = 15.0
REALM = "aleatoria.test"
RELAY_PORTS = 40  # relay addresses one test server may hand out


def find_turnserver() -> str | None:
    return os.environ.get("ALEATORIA_TURNSERVER") or shutil.which("turnserver")


def find_uclient() -> str | None:
    return shutil.which("turnutils_uclient")


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now (TURN listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


def relay_range() -> tuple[int, int]:
    """A range of UDP ports for relay addresses, away from the kernel's ephemeral range (so
    other tests' sockets rarely sit in it); coturn skips a port it cannot bind."""
    low = random.randrange(20_000, 30_000 - RELAY_PORTS)
    return low, low + RELAY_PORTS - 1


class TurnServer:
    """One ``turnserver`` process and its log."""

    def __init__(self, binary: str, directory: Path, secrets: tuple[str, ...]) -> None:
        self.secrets = secrets
        self.port = free_port()
        self.min_port, self.max_port = relay_range()
        args = [
            binary,
            "-n",  # no configuration file: everything is on this line
            "-v",  # log every allocation (the tests read them)
            "--listening-ip=127.0.0.1",
            f"--listening-port={self.port}",
            "--relay-ip=127.0.0.1",
            f"--min-port={self.min_port}",
            f"--max-port={self.max_port}",
            "--use-auth-secret",
            *(f"--static-auth-secret={secret}" for secret in secrets),
            f"--realm={REALM}",
            "--allow-loopback-peers",  # tests only: the peers are on 127.0.0.1
            "--fingerprint",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--no-software-attribute",
            f"--db={directory / 'turndb'}",
            f"--pidfile={directory / 'turnserver.pid'}",
            "--log-file=stdout",
            "--simple-log",
        ]
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(START_SECONDS) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError("turnserver did not start:\n" + "\n".join(self.lines[-40:]))

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=udp"

    def _read(self) -> None:
        assert self.process.stdout is not None
        opened = re.compile(rf"UDP listener opened on: 127\.0\.0\.1:{self.port}\b")
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if opened.search(line):
                self._ready.set()
        self._ready.set()  # the process ended: the waiter checks poll()

    def allocations(self, username: str) -> list[str]:
        """The log lines where coturn accepted an allocation for ``username``."""
        return [
            line
            for line in list(self.lines)
            if f"user <{username}>" in line and "ALLOCATE processed, success" in line
        ]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextmanager
def started(binary: str, directory: Path, secrets: tuple[str, ...]) -> Iterator[TurnServer]:
    server = TurnServer(binary, directory, secrets)
    try:
        yield server
    finally:
        server.stop()


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def turnserver_binary() -> str:
    binary = find_turnserver()
    if binary is None:
        _missing("coturn's turnserver not found (run scripts/install-coturn.sh)")
    assert binary is not None
    return binary


@pytest.fixture(scope="session")
def uclient_binary() -> str:
    binary = find_uclient()
    if binary is None:
        _missing("coturn's turnutils_uclient not found (run scripts/install-coturn.sh)")
    assert binary is not None
    return binary
