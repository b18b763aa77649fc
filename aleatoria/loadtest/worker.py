"""One load-generating worker: a trio run of the scenario over this worker's share.

A worker runs either in a thread of the tool's own process (``--processes 1``) or in
a spawned child process. Either way it talks to the coordinator only through a queue
(``("progress", index, snapshot)`` about twice a second, then exactly one
``("result", index, outcome)``) and a stop flag it polls; so Ctrl-C is handled in one
place, the coordinator, and a worker always gets to drain and report.
It also measures itself: the CPU time of the thread running the event loop (one
Python event loop cannot use more than one core, so ~100 % of a core means the tool,
not the server, was the bottleneck) and the event loop's lag (how late a 50 ms sleep
wakes up), both reported per worker.
"""

from __future__ import annotations

import functools
import resource
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

import trio

from aleatoria.loadtest.context import RunContext, WorkerPlan
from aleatoria.loadtest.payload import now_ns
from aleatoria.loadtest.scenarios import run_scenario
from aleatoria.loadtest.stats import Stats

PROGRESS_INTERVAL = 0.5
LAG_PROBE = 0.05


class Outbox(Protocol):
    """``queue.Queue`` or ``multiprocessing.Queue``: all a worker needs of either."""

    def put(self, item: Any) -> None: ...


class StopFlag(Protocol):
    """``threading.Event`` or ``multiprocessing.Event``."""

    def is_set(self) -> bool: ...


def snapshot(ctx: RunContext) -> dict[str, Any]:
    """What the live display needs from this worker right now (small, picklable)."""
    return {
        "phase": ctx.phase,
        "open": ctx.open_connections,
        "counters": dict(ctx.stats.counters),
        "recent": {k: h.to_dict() for k, h in ctx.stats.take_recent().items()},
        "load_started_ns": ctx.load_started_ns,
    }


async def run_worker(
    plan: WorkerPlan,
    stats: Stats,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    publish: Callable[[dict[str, Any]], None] = lambda snap: None,
) -> dict[str, Any]:
    """Run this worker's share of the scenario; return its outcome (without the stats).

    ``should_stop`` is polled; when it turns true the load phase ends early (a partial
    run, still drained). Figures go into ``stats``, which the caller owns, so they
    survive even if this is cancelled. Cancellation propagates.
    """
    ctx = RunContext(plan, stats)
    cpu_start = time.thread_time()
    wall_start = now_ns()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_stop, ctx, should_stop)
        nursery.start_soon(_probe_lag, ctx)
        nursery.start_soon(_publish, ctx, publish)
        await run_scenario(ctx)
        nursery.cancel_scope.cancel()
    wall = (now_ns() - wall_start) / 1e9
    cpu = time.thread_time() - cpu_start
    load_ns = max(ctx.load_ended_ns - ctx.load_started_ns, 0) if ctx.load_started_ns else 0
    return {
        "index": plan.index,
        "interrupted": ctx.interrupted,
        "phase": ctx.phase,
        "wall_s": round(wall, 3),
        "load_s": round(load_ns / 1e9, 3),
        "load_started_ns": ctx.load_started_ns,
        "cpu_s": round(cpu, 3),
        "cpu_share": round(cpu / wall, 3) if wall > 0 else 0.0,
        "error": None,
    }


async def _watch_stop(ctx: RunContext, should_stop: Callable[[], bool]) -> None:
    # The flag is a threading or multiprocessing Event, which trio cannot await; a
    # 50 ms poll is cheap and keeps Ctrl-C prompt.
    while not should_stop():  # noqa: ASYNC110
        await trio.sleep(0.05)
    ctx.request_stop(interrupted=True)


async def _probe_lag(ctx: RunContext) -> None:
    while True:
        started = now_ns()
        await trio.sleep(LAG_PROBE)
        woke = now_ns()
        ctx.stats.observe("generator.loop_lag", woke - started - int(LAG_PROBE * 1e9), woke)


async def _publish(ctx: RunContext, publish: Callable[[dict[str, Any]], None]) -> None:
    while True:
        publish(snapshot(ctx))
        await trio.sleep(PROGRESS_INTERVAL)


def raise_fd_limit() -> None:
    """Let one process hold as many sockets as the hard limit allows (``conns`` needs it)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def worker_main(plan: WorkerPlan, outbox: Outbox, stop: StopFlag, child: bool) -> None:
    """Entry point of a worker thread or spawned process; always posts one result."""
    if child:
        # Ctrl-C reaches the whole process group; only the coordinator reacts to it,
        # by setting ``stop``, so that every worker drains and reports.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_fd_limit()
    stats = Stats(plan.epoch_ns)
    outcome: dict[str, Any] = {"index": plan.index, "interrupted": False, "error": None}
    try:
        outcome = trio.run(
            functools.partial(
                run_worker,
                plan,
                stats,
                should_stop=stop.is_set,
                publish=lambda snap: outbox.put(("progress", plan.index, snap)),
            )
        )
    except Exception as exc:  # reported, not raised: the other workers' figures still count
        outcome["error"] = f"{type(exc).__name__}: {exc}"
    outcome["stats"] = stats.to_dict()
    outbox.put(("result", plan.index, outcome))
