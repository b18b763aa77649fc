"""``aleatoria serve --workers N``: N worker processes sharing one port (SO_REUSEPORT).

How this works. The parent binds the port first, with SO_REUSEPORT and without listening,
so the kernel hands it no connections: with ``--port 0`` that picks the port every worker
then binds, and keeping the socket bound reserves the port while a worker restarts. Each
worker is ``python -m aleatoria serve <the same arguments> --port P --worker I``: a whole
server (its own instance id, its own Redis connections) that listens with SO_REUSEPORT; the
kernel spreads new connections over the listening workers. Workers need Redis: it is what
makes them one server (presence, pub/sub, shared pool).

A worker's stdin is a pipe from the parent: a worker whose parent died (even ``kill -9``)
reads EOF and shuts down gracefully. A worker writes ``ready`` on its stdout once it
listens; the parent logs ``listening on ws://HOST:PORT/ws`` once, when every worker is
ready. A worker that exits while the parent is not shutting down is restarted after a
backoff (0.5 s, doubling to 10 s; back to 0.5 s after it ran for 30 s); one that dies five
times in a row before it was ready (it cannot start: a port taken by a program without
SO_REUSEPORT, a broken environment) stops everything, exit 1. SIGTERM or SIGINT:
every worker gets SIGTERM (and shuts down gracefully: 1001 to its clients, history flushed,
presence removed); one still running after ``shutdown_timeout`` + 5 s is killed. The parent
exits 0 when every worker exited 0.

No trio in the workers' hot path: the parent only supervises (it runs trio for process and
signal handling).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence

import trio

from aleatoria.config import Config

log = logging.getLogger("aleatoria.workers")

_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 10.0
_HEALTHY_AFTER = 30.0
_KILL_GRACE = 5.0
_GIVE_UP_AFTER = 5  # a worker that dies this many times in a row before ready: stop all


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, non-listening SO_REUSEPORT socket on ``host:port`` (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class Supervisor:
    """The parent: starts, restarts and stops the workers."""

    def __init__(self, config: Config, serve_args: Sequence[str], port: int) -> None:
        self.config = config
        self.count = config.workers
        self.port = port
        self.serve_args = list(serve_args)
        self.stopping = False
        self.processes: dict[int, trio.Process] = {}
        self.exit_codes: dict[int, int] = {}
        self.restarts = 0
        self.gave_up = False
        self._ready: set[int] = set()
        self._stopped = trio.Event()
        self._announced = False

    def command(self, index: int) -> list[str]:
        # Later flags win in argparse: the worker gets the chosen port and one worker.
        return [
            sys.executable,
            "-m",
            "aleatoria",
            "serve",
            *self.serve_args,
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--worker",
            str(index),
        ]

    async def run(self) -> int:
        """Run the workers until SIGTERM/SIGINT; returns the exit code."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._stop_on_signal, signals)
                async with trio.open_nursery() as slots:
                    for index in range(self.count):
                        slots.start_soon(self._slot, index)
                    await self._stopped.wait()
                    slots.start_soon(self._stop_all)
                outer.cancel_scope.cancel()
        failed = {index: code for index, code in self.exit_codes.items() if code != 0}
        if failed or self.gave_up:
            log.error("event=workers_stopped failed=%s gave_up=%s", failed, self.gave_up)
            return 1
        log.info("event=workers_stopped")
        return 0

    def _stop(self) -> None:
        self.stopping = True
        self._stopped.set()

    async def _stop_on_signal(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            log.info("event=signal signal=%s action=stopping_workers", signal.Signals(signum).name)
            self._stop()
            return

    async def _stop_all(self) -> None:
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        with trio.move_on_after(self.config.shutdown_timeout + _KILL_GRACE):
            for process in list(self.processes.values()):
                await process.wait()
        for index, process in self.processes.items():
            if process.returncode is None:
                log.warning(
                    "event=worker_killed worker=%d pid=%d reason=shutdown_timeout", index, process.pid
                )
                process.kill()

    async def _slot(self, index: int) -> None:
        backoff = _BACKOFF_FIRST
        early = 0  # consecutive deaths before the worker was ready
        while not self.stopping:
            started = trio.current_time()
            process = await trio.lowlevel.open_process(
                self.command(index), stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            self.processes[index] = process
            log.info("event=worker_started worker=%d pid=%d port=%d", index, process.pid, self.port)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_ready, index, process)
                code = await process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    await stream.aclose()  # our ends of its pipes
            was_ready = index in self._ready
            self._ready.discard(index)
            if self.stopping:
                # SIGTERM before the worker set up its handlers (still starting): a clean stop.
                self.exit_codes[index] = 0 if code == -signal.SIGTERM and not was_ready else code
                return
            early = 0 if was_ready else early + 1
            if early >= _GIVE_UP_AFTER:
                log.error(
                    "event=worker_keeps_failing worker=%d code=%d deaths_before_ready=%d action=stopping",
                    index,
                    code,
                    early,
                )
                self.gave_up = True
                self._stop()
                return
            if trio.current_time() - started > _HEALTHY_AFTER:
                backoff = _BACKOFF_FIRST
            self.restarts += 1
            log.warning(
                "event=worker_died worker=%d pid=%d code=%d action=restarting in=%.1fs",
                index,
                process.pid,
                code,
                backoff,
            )
            with trio.move_on_after(backoff):
                await self._stopped.wait()  # the backoff, cut short by a shutdown
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _read_ready(self, index: int, process: trio.Process) -> None:
        assert process.stdout is not None
        buffer = b""
        async for chunk in process.stdout:
            buffer += chunk
            if b"ready" in buffer and index not in self._ready:
                self._ready.add(index)
                log.info("event=worker_ready worker=%d pid=%d", index, process.pid)
                if len(self._ready) == self.count and not self._announced:
                    self._announced = True
                    where = f"{_display_host(self.config.host)}:{self.port}"
                    log.info(
                        "listening on ws://%s/ws workers=%d health=http://%s/health", where, self.count, where
                    )
            buffer = buffer[-16:]


def run_workers(config: Config, serve_args: Sequence[str]) -> int:
    """Run ``config.workers`` workers until a signal; the parent's exit code. Raises OSError
    if the port cannot be bound."""
    with reserve_port(config.host, config.port) as reserved:
        port = reserved.getsockname()[1]
        return trio.run(Supervisor(config, serve_args, port).run)


async def exit_when_parent_dies(scope: trio.CancelScope) -> None:
    """In a worker: cancel ``scope`` when stdin (the parent's pipe) reaches EOF."""
    stream = trio.lowlevel.FdStream(os.dup(0))
    async with stream:
        while await stream.receive_some(1024):
            pass
    log.warning("event=parent_gone action=shutting_down")
    scope.cancel()


def _display_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
