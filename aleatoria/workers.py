"""``aleatoria serve --workers N``: N worker processes sharing one port (SO_REUSEPORT).

How this works. The parent binds the port first, with SO_REUSEPORT and without listening,
so the kernel hands it no connections: with ``--port 0`` that picks the port every worker
then binds, and keeping the socket bound reserves the port while a worker restarts. Each
worker is ``python -m aleatoria serve <the same arguments> --port P --worker I``: a whole
server (its own instance id, its own Redis connections) that listens with SO_REUSEPORT; the
kernel spreads new connections over the listening workers. Workers need Redis: it is what
makes them one server (presence, pub/sub, shared pool).

A worker's stdin is a pipe from the parent: a worker whose parent died (even ``kill -9``)
reads EOF and shuts down gracefully; the parent writes ``stop`` on it to stop a worker. A
worker's stdout is a pipe to the parent, one report per line: ``ready`` once it listens, or
``start_failed reason=... error=...`` when it could not (then it exits 1). The parent logs
``listening on ws://HOST:PORT/ws`` once, when every worker is ready.

Start-up failure: a worker that exits before its first ``ready`` (it cannot listen, or it
crashed while starting) would fail the same way again, so the parent does not restart it:
it logs one ``event=start_failed worker=I`` line with the worker's reason, stops the other
workers and exits with the worker's status (1 if a signal killed it).

A worker that exits after it was ready, while the parent is not shutting down, is restarted
after a backoff (0.5 s, doubling to 10 s; back to 0.5 s after it ran for 30 s); if its
replacements die five times in a row before they are ready (the port was taken meanwhile, a
broken environment), everything stops as for a start-up failure. SIGTERM or SIGINT to the
parent: every worker gets SIGTERM and ``stop`` on its stdin (and shuts down gracefully: 1001
to its clients, history flushed, presence removed); one still running after
``shutdown_timeout`` + 5 s is killed. The parent exits 0 when every worker exited 0.

The same signal sent to the whole process group (Ctrl-C in a terminal, systemd's default
``KillMode=control-group``) reaches every worker directly and then again from the parent. A
worker therefore ignores SIGINT and SIGTERM except while its server's handlers are installed
(``ignore_stop_signals``; ``cli._run`` keeps them until the drain is over): a second signal
must not kill a draining worker, nor one that is exiting. A worker that has no handlers yet
(still starting) learns of the stop from its stdin, which it watches from the start.

No trio in the workers' hot path: the parent only supervises (it runs trio for process and
signal handling).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence

import trio

from aleatoria.config import Config
from aleatoria.overview import TreeView, answer_forever

log = logging.getLogger("aleatoria.workers")

_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 10.0
_HEALTHY_AFTER = 30.0
_KILL_GRACE = 5.0
_GIVE_UP_AFTER = 5  # a restarted worker that dies this many times in a row before ready: stop all
_REPORT_MAX = 4096  # bytes of a worker's report line kept (a report is one short line)


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

    def __init__(
        self, config: Config, serve_args: Sequence[str], port: int, view: socket.socket | None = None
    ) -> None:
        self.config = config
        self.view = view  # metrics_port's listener: the tree's /health and /metrics
        self.count = config.workers
        self.port = port
        self.serve_args = list(serve_args)
        self.stopping = False
        self.processes: dict[int, trio.Process] = {}
        self.exit_codes: dict[int, int] = {}
        self.restarts = 0
        self.gave_up = False
        # The exit status of the worker whose start-up failure stopped everything.
        self.start_failure: int | None = None
        self._ready: set[int] = set()
        self._failure_reports: dict[int, str] = {}
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
        # A second SIGTERM or SIGINT (an impatient operator, a group signal after the
        # parent's) must not kill the parent once its workers stopped cleanly: leaving the
        # receiver puts back the handlers it found and re-raises the signals it holds, so
        # the handlers it finds only note a signal (``hold_stop_signals``), never exit.
        early = hold_stop_signals()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._stop_on_signal, noted_then(early, signals))
                if self.view is not None:
                    outer.start_soon(answer_forever, self.view, TreeView(self, os.getpid()).answer)
                async with trio.open_nursery() as slots:
                    for index in range(self.count):
                        slots.start_soon(self._slot, index)
                    await self._stopped.wait()
                    slots.start_soon(self._stop_all)
                outer.cancel_scope.cancel()
        release_wakeup_fd()
        if self.start_failure is not None:
            return self.start_failure  # its start_failed line is the one to read
        failed = {index: code for index, code in self.exit_codes.items() if code != 0}
        if failed or self.gave_up:
            log.error("event=workers_stopped failed=%s gave_up=%s", failed, self.gave_up)
            return 1
        log.info("event=workers_stopped")
        return 0

    def ready_workers(self) -> dict[int, int]:
        """Worker index -> pid, of the workers that are ready (for the tree's view)."""
        return {index: self.processes[index].pid for index in sorted(self._ready)}

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
                await _ask_to_stop(process)
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
        first = True  # the slot's first worker: exiting before ready is a start-up failure
        while not self.stopping:
            started = trio.current_time()
            self._failure_reports.pop(index, None)  # a report is about the worker that sent it
            process = await trio.lowlevel.open_process(
                self.command(index), stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            self.processes[index] = process
            log.info("event=worker_started worker=%d pid=%d port=%d", index, process.pid, self.port)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_reports, index, process)
                code = await process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    await stream.aclose()  # our ends of its pipes
            was_ready = index in self._ready
            self._ready.discard(index)
            if self.stopping:
                # A signal to the group before the worker set up its handlers (Python still
                # starting): a clean stop.
                early_signal = code in (-signal.SIGTERM, -signal.SIGINT) and not was_ready
                self.exit_codes[index] = 0 if early_signal else code
                return
            early = 0 if was_ready else early + 1
            if first and not was_ready:
                self._start_failed(index, process.pid, code, "")
                return
            first = False
            if early >= _GIVE_UP_AFTER:
                self.gave_up = True
                self._start_failed(index, process.pid, code, f"deaths_before_ready={early} ")
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

    def _start_failed(self, index: int, pid: int, code: int, extra: str) -> None:
        """Stop everything because worker ``index`` cannot start; its report, if it sent one,
        says why (else it crashed: its traceback is on stderr, which it shares with us)."""
        self.start_failure = code if code > 0 else 1
        report = self._failure_reports.pop(index, "reason=exited_before_ready")
        log.error(
            "event=start_failed worker=%d pid=%d code=%d %s%s action=stopping_workers",
            index,
            pid,
            code,
            extra,
            report,
        )
        self._stop()

    async def _read_reports(self, index: int, process: trio.Process) -> None:
        """Read worker ``index``'s report lines until its stdout closes (it exited)."""
        assert process.stdout is not None
        buffer = b""
        async for chunk in process.stdout:
            *lines, buffer = (buffer + chunk).split(b"\n")
            buffer = buffer[-_REPORT_MAX:]
            for line in lines:
                self._report(index, process.pid, line.decode(errors="replace").strip())

    def _report(self, index: int, pid: int, line: str) -> None:
        if line.startswith("start_failed "):
            self._failure_reports[index] = line.removeprefix("start_failed ")[:_REPORT_MAX]
        elif line == "ready" and index not in self._ready:
            self._ready.add(index)
            log.info("event=worker_ready worker=%d pid=%d", index, pid)
            if len(self._ready) == self.count and not self._announced:
                self._announced = True
                where = f"{_display_host(self.config.host)}:{self.port}"
                view = where
                if self.view is not None:
                    view = f"{_display_host(self.config.host)}:{self.view.getsockname()[1]}"
                log.info(
                    "listening on ws://%s/ws workers=%d health=http://%s/health metrics=http://%s/metrics",
                    where,
                    self.count,
                    view,
                    view,
                )


def run_workers(
    config: Config, serve_args: Sequence[str], reserved: socket.socket, view: socket.socket | None = None
) -> int:
    """Run ``config.workers`` workers on the port ``reserved`` holds (``reserve_port``) until a
    signal or a worker's start-up failure; returns the parent's exit status. ``view``: the
    listener of ``metrics_port``, on which the parent answers for the whole tree."""
    port: int = reserved.getsockname()[1]
    status = trio.run(Supervisor(config, serve_args, port, view).run)
    ignore_stop_signals()  # see ``hold_stop_signals``
    return status


STOP = b"stop\n"  # the parent's stop request, on a worker's stdin


def ignore_stop_signals() -> None:
    """In a worker, before its server runs: SIGINT and SIGTERM are ignored except while the
    server's own handlers are installed (cli._run then puts ``hold_stop_signals``' in place,
    which do not exit either). So a signal that comes after the drain (the group's signal
    first, then the parent's) cannot kill the worker while it exits, and one that comes while
    it starts is not lost: the parent also asks on stdin (``STOP``), which the worker watches
    from the start."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def hold_stop_signals() -> list[int]:
    """Install SIGINT and SIGTERM handlers that only note the signal, in the list returned:
    for the time around a ``trio.open_signal_receiver`` (a process about to serve, or done
    serving and on its way out). The receiver puts these back when it closes and re-raises
    the signals it still holds; with the default handlers a second signal, sent during the
    drain or after it, killed a process that had stopped cleanly (exit -15, or -2 after a
    KeyboardInterrupt traceback). One that comes before the receiver opens is in the list, so
    it is not lost. Once ``trio.run`` returns the caller ignores both (``ignore_stop_signals``):
    trio puts its entry SIGINT handler back, and Python resets a handler of its own to the
    default while the interpreter finalizes, but not an ignored signal."""
    noted: list[int] = []

    def note(signum: int, _frame: object) -> None:
        noted.append(signum)

    signal.signal(signal.SIGINT, note)
    signal.signal(signal.SIGTERM, note)
    return noted


def release_wakeup_fd() -> None:
    """Call once the signal receiver has closed, before the function ``trio.run`` runs returns.
    trio closes its wakeup socket before it puts the previous wakeup fd back, and a signal in
    between (a second SIGINT as the process stops) made Python print "Exception ignored when
    trying to write to the signal wakeup fd" with a BrokenPipeError traceback (seen in CI, the
    ``--workers`` parent's second-signal test). Nothing needs waking by then: the handlers
    in place only note the signal (``hold_stop_signals``)."""
    signal.set_wakeup_fd(-1)


async def noted_then(noted: list[int], signals: AsyncIterator[int]) -> AsyncIterator[int]:
    """The signals ``hold_stop_signals`` noted before ``signals`` (a receiver) took over,
    then the receiver's."""
    for signum in noted:
        yield signum
    async for signum in signals:
        yield signum


async def stop_when_parent_says(scope: trio.CancelScope) -> None:
    """In a worker: cancel ``scope`` when the parent writes ``STOP`` on stdin, or when stdin
    (the parent's pipe) reaches EOF: the parent died, even by ``kill -9``."""
    stream = trio.lowlevel.FdStream(os.dup(0))
    received = b""
    async with stream:
        while chunk := await stream.receive_some(1024):
            received = (received + chunk)[-len(STOP) :]
            if received == STOP:
                log.info("event=stop_requested by=parent")
                scope.cancel()
                return
    log.warning("event=parent_gone action=shutting_down")
    scope.cancel()


async def _ask_to_stop(process: trio.Process) -> None:
    """Write ``STOP`` on a worker's stdin: a worker still starting has no signal handlers yet
    (it ignores signals until then), but it reads its stdin from the start."""
    if process.stdin is None:
        return
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):  # it exited
        await process.stdin.send_all(STOP)


def _display_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
