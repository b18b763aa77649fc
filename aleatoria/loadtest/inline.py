"""Run a load test inside the caller's trio run: one worker, no threads, no display.

For tests and for embedding (a benchmark that starts the server in the same trio run).
The CLI uses ``coordinator.run_load`` instead, which adds worker processes, the live
display and Ctrl-C handling.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from aleatoria.loadtest.context import WorkerPlan
from aleatoria.loadtest.options import Options
from aleatoria.loadtest.procstat import ServerMonitor
from aleatoria.loadtest.results import RunResult
from aleatoria.loadtest.stats import Stats
from aleatoria.loadtest.worker import run_worker


async def run_inline(options: Options, *, stop: trio.Event | None = None) -> RunResult:
    """Run ``options`` (validated by the caller) in this trio run and return the result.

    Setting ``stop`` ends the load phase early, as Ctrl-C does in the CLI (the result is
    then ``interrupted``). Cancellation propagates and discards the figures.
    """
    plan = WorkerPlan(options)
    stats = Stats(plan.epoch_ns)
    monitor = ServerMonitor(options.server_pid) if options.server_pid else None
    started = time.monotonic()
    if monitor:
        monitor.sample()

    def on_progress(snapshot: dict[str, Any]) -> None:
        if monitor:
            monitor.sample(load_started=snapshot["phase"] != "connecting")

    outcome = await run_worker(
        plan,
        stats,
        should_stop=stop.is_set if stop is not None else lambda: False,
        publish=on_progress,
    )
    if monitor:
        monitor.sample()
    return RunResult(
        options=options,
        stats=stats,
        workers=[outcome],
        interrupted=bool(outcome["interrupted"]),
        wall_s=time.monotonic() - started,
        server=monitor.summary(stats.get("conn.opened")) if monitor else None,
    )
