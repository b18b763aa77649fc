"""Starts the workers, shows progress, handles Ctrl-C, merges the results.

How this works: the coordinator runs in the tool's main thread and never runs an event
loop itself. It starts one worker thread (``--processes 1``) or N spawned processes,
then loops on their queue: progress snapshots go to the display, results are merged.
The first Ctrl-C sets the shared stop flag: each worker ends its load phase, drains
and posts a (partial) result. A second Ctrl-C, or the hard deadline (the longest a run
can legitimately take, plus a margin), stops waiting: workers that have not reported
are left out, and the report says so.
"""

from __future__ import annotations

import math
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aleatoria.loadtest.context import CLOSE_GRACE, WorkerPlan
from aleatoria.loadtest.histogram import Histogram
from aleatoria.loadtest.options import Options
from aleatoria.loadtest.payload import now_ns
from aleatoria.loadtest.procstat import ServerMonitor, machine_cpu
from aleatoria.loadtest.results import Display, ProgressView, RunResult
from aleatoria.loadtest.stats import Stats
from aleatoria.loadtest.worker import worker_main

SAMPLE_INTERVAL = 0.5
ABORT_GRACE = 15.0


def hard_deadline(options: Options) -> float:
    """Seconds after which the coordinator gives up waiting: a bounded run, always."""
    waves = math.ceil(options.connection_count() / max(options.connect_concurrency, 1))
    connecting = options.connect_timeout * (waves + 1)
    return connecting + options.duration + options.drain_timeout + CLOSE_GRACE + 30.0


_PHASE_ORDER = ("connecting", "load", "drain", "closing", "done")


class _Run:
    def __init__(self, options: Options, display: Display | None) -> None:
        self.options = options
        self.display = display
        self.count = options.worker_count()
        self.epoch = now_ns()
        self.started = time.monotonic()
        self.snapshots: dict[int, dict[str, Any]] = {}
        self.results: dict[int, dict[str, Any]] = {}
        self.interrupts = 0
        self.monitor = ServerMonitor(options.server_pid) if options.server_pid else None

    def on_sigint(self, signum: int, frame: object) -> None:
        self.interrupts += 1

    def view(self) -> ProgressView:
        counters: dict[str, int] = {}
        recent: dict[str, Histogram] = {}
        phases = []
        load_started = 0
        for snap in self.snapshots.values():
            for key, value in snap["counters"].items():
                counters[key] = counters.get(key, 0) + value
            for key, data in snap["recent"].items():
                recent.setdefault(key, Histogram()).merge(Histogram.from_dict(data))
            phases.append(snap["phase"])
            if snap["load_started_ns"]:
                load_started = min(load_started or snap["load_started_ns"], snap["load_started_ns"])
        phase = min(phases, key=_PHASE_ORDER.index) if phases else "starting"
        now = now_ns()
        return ProgressView(
            options=self.options,
            elapsed_s=time.monotonic() - self.started,
            load_elapsed_s=(now - load_started) / 1e9 if load_started else 0.0,
            phase=phase,
            open_connections=sum(s["open"] for s in self.snapshots.values()),
            counters=counters,
            recent=recent,
            interrupted=self.interrupts > 0,
        )

    def all_loading(self) -> bool:
        return len(self.snapshots) == self.count and all(
            s["phase"] != "connecting" for s in self.snapshots.values()
        )

    def run(self) -> RunResult:
        plans = [WorkerPlan(self.options, i, self.count, self.epoch) for i in range(self.count)]
        cpu_start = machine_cpu()
        if self.monitor:
            self.monitor.sample()
        inbox: Any
        stop: Any
        processes: list[Any] = []
        if self.count == 1:
            inbox, stop = queue.Queue(), threading.Event()
            thread = threading.Thread(target=worker_main, args=(plans[0], inbox, stop, False), daemon=True)
            thread.start()
        else:
            # spawn, not fork: a forked child would inherit the parent's threads and
            # locks in whatever state they were; spawn is also what macOS uses.
            mp = multiprocessing.get_context("spawn")
            inbox, stop = mp.Queue(), mp.Event()
            processes = [
                mp.Process(target=worker_main, args=(plan, inbox, stop, True), daemon=True) for plan in plans
            ]
            for process in processes:
                process.start()
        deadline = self.started + hard_deadline(self.options)
        give_up_at = math.inf
        next_sample = 0.0
        while len(self.results) < self.count:
            if self.interrupts and not stop.is_set():
                stop.set()
            now = time.monotonic()
            if now > deadline and give_up_at == math.inf:
                stop.set()
                give_up_at = now + ABORT_GRACE
            if self.interrupts > 1 or now > give_up_at:
                break
            if processes and all(not p.is_alive() for p in processes) and inbox.empty():
                break  # every child died without reporting
            try:
                kind, index, body = inbox.get(timeout=0.1)
            except queue.Empty:
                pass
            else:
                if kind == "progress":
                    self.snapshots[index] = body
                else:
                    self.results[index] = body
            if now >= next_sample:
                next_sample = now + SAMPLE_INTERVAL
                if self.monitor:
                    self.monitor.sample(load_started=self.all_loading())
                if self.display is not None:
                    self.display.update(self.view())
        stop.set()
        for process in processes:
            process.join(timeout=1.0)
            if process.is_alive():
                process.terminate()
        return self.finish(cpu_start)

    def finish(self, cpu_start: tuple[float, float] | None) -> RunResult:
        stats = Stats(self.epoch)
        workers = []
        for index in sorted(self.results):
            outcome = dict(self.results[index])
            stats.merge(Stats.from_dict(outcome.pop("stats")))
            workers.append(outcome)
        busy: float | None = None
        cpu_end = machine_cpu()
        if cpu_start and cpu_end and cpu_end[1] > cpu_start[1]:
            busy = (cpu_end[0] - cpu_start[0]) / (cpu_end[1] - cpu_start[1])
        server = None
        if self.monitor:
            self.monitor.sample()
            server = self.monitor.summary(stats.get("conn.opened"))
        return RunResult(
            options=self.options,
            stats=stats,
            workers=workers,
            interrupted=self.interrupts > 0 or any(w.get("interrupted") for w in workers),
            missing_workers=self.count - len(workers),
            wall_s=time.monotonic() - self.started,
            server=server,
            machine_busy=busy,
        )


@contextmanager
def _sigint_counter(run: _Run) -> Iterator[None]:
    """Count Ctrl-Cs instead of raising, while in the main thread (signals live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, run.on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_load(options: Options, display: Display | None = None) -> RunResult:
    """Run the whole load test described by ``options`` (already validated); block until done.

    Ctrl-C ends the run early with a partial result (``interrupted``); a second one
    abandons the workers still draining. Never raises for what the server does.
    """
    run = _Run(options, display)
    with _sigint_counter(run):
        return run.run()
