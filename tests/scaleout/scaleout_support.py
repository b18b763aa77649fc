"""Helpers of the scale-out tests: a Redis Cluster, several server instances (in-process or
as real ``aleatoria serve`` processes), and waits on them. Clients: ``support.connect``."""

from __future__ import annotations

import random
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import redis
import redis.cluster
import trio
from redis_server import spawn, wait_ready
from support import SocketPeer

import aleatoria.server
from aleatoria.config import Config

_START_SECONDS = 15.0

# Scale-out timing for tests: dead instances are noticed within 1.5 + 0.3 s.
FAST_PRESENCE = {"presence_ttl": 1.5, "heartbeat_interval": 0.3}
# For storms, which test what instances do together, not the noticing of dead ones: under
# the whole suite's load on 2 cores, the fast TTL had live instances declared dead mid-storm.
CALM_PRESENCE = {"presence_ttl": 10.0, "heartbeat_interval": 3.0}


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(1000):
        port = random.randrange(20000, 50000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair")


class RedisCluster:
    """A Redis Cluster of ``masters`` nodes without replicas, from one redis-server binary."""

    def __init__(self, binary: str, directory: Path, masters: int = 3) -> None:
        self.binary = binary
        self.directory = directory
        self.ports = [free_cluster_port() for _ in range(masters)]
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        for port in self.ports:
            node_dir = self.directory / str(port)
            node_dir.mkdir()
            nodes_conf = str(node_dir / "nodes.conf")
            extra = ["--cluster-enabled", "yes", "--cluster-config-file", nodes_conf]
            self.processes.append(spawn(self.binary, port, node_dir, *extra))
        self._wait(lambda r: r.ping())
        cli = shutil.which("redis-cli") or str(Path(self.binary).with_name("redis-cli"))
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
        self._wait(lambda r: "ok" == r.cluster("info").get("cluster_state"))

    def _wait(self, ready: Callable[[redis.Redis], object]) -> None:
        for process, port in zip(self.processes, self.ports, strict=True):
            if not wait_ready(process, port, ready, seconds=_START_SECONDS):
                self.stop()
                raise RuntimeError(f"cluster node {port} did not become ready")

    def flush(self) -> None:
        """Empty every node (between tests), scripts included."""
        for port in self.ports:
            with redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) as r:
                r.flushall()
                r.script_flush()

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()
        self.processes = []


@contextmanager
def redis_client(url: str) -> Iterator[Any]:
    """A plain redis-py client for checks: a cluster client for a ``+cluster`` URL."""
    if "+cluster://" not in url:
        with redis.Redis.from_url(url, socket_timeout=5) as plain:
            yield plain
        return
    host_port = url.split("://", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    cluster = redis.cluster.RedisCluster(host=host, port=int(port), socket_timeout=5)
    try:
        yield cluster
    finally:
        cluster.close()
        for node in cluster.get_nodes():  # type: ignore[no-untyped-call]
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()


def instance_config(url: str, **overrides: Any) -> Config:
    values: dict[str, Any] = {"port": 0, "redis_url": url, "rate_limit": 0, "match_rate": 0, **FAST_PRESENCE}
    values.update(overrides)
    return Config(**values)


@asynccontextmanager
async def instances(url: str, count: int, **overrides: Any) -> AsyncIterator[list[int]]:
    """``count`` in-process server instances sharing ``url``; yields their ports."""
    async with trio.open_nursery() as nursery:
        ports = []
        for _ in range(count):
            ports.append(await nursery.start(aleatoria.server.serve, instance_config(url, **overrides)))
        try:
            yield ports
        finally:
            nursery.cancel_scope.cancel()


async def collect_chat(client: SocketPeer, count: int) -> list[dict[str, Any]]:
    """The next ``count`` chat messages ``client`` receives, skipping anything else."""
    out: list[dict[str, Any]] = []
    while len(out) < count:
        out.append(await client.expect("chat_message", skip=True))
    return out


async def wait_until(predicate: Any, *, timeout: float = 10.0) -> float:
    """Wait until ``predicate()`` (a check of Redis or of a process) holds; returns how long
    it took."""
    start = trio.current_time()
    with trio.fail_after(timeout):
        while True:
            if await trio.to_thread.run_sync(predicate):
                return trio.current_time() - start
            await trio.sleep(0.05)  # the observed system has no push channel to wait on


# -- real processes ---------------------------------------------------------------------------

_LISTENING = re.compile(rb"listening on ws://127\.0\.0\.1:(\d+)/ws")
_INSTANCE = re.compile(rb"instance=([0-9a-f]+)")


class ServerProcess:
    """``python -m aleatoria serve ...`` as a subprocess, with its log collected."""

    def __init__(self, process: trio.Process, log: bytearray) -> None:
        self.process = process
        self.log = log
        self.port = 0
        self.instance = ""
        self._grew = trio.Event()

    def text(self) -> str:
        return self.log.decode(errors="replace")

    def grew(self) -> None:
        self._grew.set()
        self._grew = trio.Event()

    async def wait_for_log(self, predicate: Callable[[str], bool]) -> None:
        """Wait until ``predicate(log text)`` holds (checked whenever the log grows)."""
        while not predicate(self.text()):
            await self._grew.wait()

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)


@asynccontextmanager
async def serve_process(
    *flags: str, expect_exit: int | None = 0, own_group: bool = False
) -> AsyncIterator[ServerProcess]:
    """``aleatoria serve --port 0 FLAGS`` until it logs that it listens; on exit SIGTERM and
    (unless killed by the test) an exit code of ``expect_exit``. ``own_group``: the server
    leads a process group of its own (its pid is the group's id), as under a terminal or
    systemd, so a test can signal the whole group."""
    command = [
        sys.executable,
        "-m",
        "aleatoria",
        "serve",
        "--port",
        "0",
        "--rate-limit",
        "0",
        "--match-rate",
        "0",
        *flags,
    ]
    process = await trio.lowlevel.open_process(
        command, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=own_group
    )
    assert process.stderr is not None
    stderr = process.stderr
    log = bytearray()
    server = ServerProcess(process, log)
    listening = trio.Event()

    async def read_log() -> None:
        async for chunk in stderr:
            log.extend(chunk)
            server.grew()
            found = _LISTENING.search(log)
            if found and not listening.is_set():
                server.port = int(found.group(1))
                instance = _INSTANCE.search(log, found.start())
                server.instance = instance.group(1).decode() if instance else ""
                listening.set()
        listening.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_log)
            with trio.fail_after(_START_SECONDS):
                await listening.wait()
            assert server.port, f"server did not start: {server.text()}"
            try:
                yield server
            finally:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                with trio.fail_after(15):
                    code = await process.wait()
                if expect_exit is not None and code != -signal.SIGKILL:
                    assert expect_exit == code, f"exit {code}: {server.text()[-3000:]}"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
