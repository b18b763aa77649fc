"""The state one worker's scenario runs in: options, stats, phases and the stop signal.

How this works: a run has four phases. ``connecting``: every client opens its
connection and gets ready (joined its room…), then waits at the ``Ready`` barrier.
``load``: traffic for ``duration`` seconds, or until a stop is requested (Ctrl-C, the
coordinator). ``drain``: no new traffic; wait, at most ``drain_timeout``, for what is in
flight to arrive, so that in-flight messages are not miscounted as lost — also on a
Ctrl-C, which is why a partial report's loss figures are still exact. ``closing``:
connections close; closes seen from here on are ours, not the server's doing.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from aleatoria.loadtest.options import Options
from aleatoria.loadtest.payload import now_ns
from aleatoria.loadtest.stats import Stats

PHASES = ("connecting", "load", "drain", "closing", "done")
# How long clients get to finish their close handshakes once told to close; clients
# still connecting or closing after that are cancelled so that Ctrl-C stays prompt.
CLOSE_GRACE = 6.0


@attrs.frozen
class WorkerPlan:
    """One worker's share of a run: it owns units index, index+count, index+2·count…"""

    options: Options
    index: int = 0
    count: int = 1
    epoch_ns: int = attrs.field(factory=now_ns)


class Ready:
    """A barrier: ``wait()`` returns once every expected client arrived (or gave up)."""

    def __init__(self, expected: int) -> None:
        self._missing = expected
        self._event = trio.Event()
        if expected <= 0:
            self._event.set()

    def token(self) -> Callable[[], None]:
        """A callable that counts one arrival, however often it is called."""
        done = False

        def arrive() -> None:
            nonlocal done
            if not done:
                done = True
                self._missing -= 1
                if self._missing <= 0:
                    self._event.set()

        return arrive

    async def wait(self) -> None:
        await self._event.wait()


class RunContext:
    """Shared by every client task of one worker; lives in exactly one trio run."""

    def __init__(self, plan: WorkerPlan, stats: Stats) -> None:
        self.plan = plan
        self.options = plan.options
        self.stats = stats
        self.phase = "connecting"
        self.stop = trio.Event()  # set when the load phase must end
        self.go = trio.Event()  # set when the load phase starts (or a stop came first)
        self.interrupted = False  # the stop came from the user, not the clock
        self.open_connections = 0
        self.load_started_ns = 0
        self.load_ended_ns = 0
        self.connect_limiter = trio.CapacityLimiter(self.options.connect_concurrency)
        self.rng = random.Random()
        self._stop_hooks: list[Callable[[], None]] = []

    def share(self, units: int) -> range:
        """The unit numbers (rooms, pairs, users…) this worker owns out of ``units``."""
        return range(self.plan.index, units, self.plan.count)

    def user_id(self, *parts: object) -> str:
        """A protocol-legal user id, unique to this run (ids are ≤ 64 chars of [\\w.@-])."""
        return "-".join([f"lt{self.options.run_id}", *map(str, parts)])

    def on_stop(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (synchronously) when the load phase ends; at once if it has."""
        if self.stop.is_set():
            hook()
        else:
            self._stop_hooks.append(hook)

    def request_stop(self, *, interrupted: bool = False) -> None:
        if self.stop.is_set():
            return
        self.interrupted = self.interrupted or interrupted
        self.stop.set()
        self.go.set()
        hooks, self._stop_hooks = self._stop_hooks, []
        for hook in hooks:
            hook()

    async def wait_ready(self, ready: Ready) -> None:
        """Return when every client is ready or a stop was requested, whichever is first."""
        async with trio.open_nursery() as nursery:

            async def until_ready() -> None:
                await ready.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_ready)
            await self.stop.wait()
            nursery.cancel_scope.cancel()

    async def run_load_phase(self) -> None:
        """Enter ``load``, return when ``duration`` elapsed or a stop was requested.

        Cancellation propagates; on return the phase is ``drain``.
        """
        if not self.stop.is_set():
            self.phase = "load"
            self.load_started_ns = now_ns()
            self.go.set()
            with trio.move_on_after(self.options.duration):
                await self.stop.wait()
            self.request_stop()
        self.load_ended_ns = now_ns()
        self.phase = "drain"


async def run_clients(clients: Sequence[Callable[[], Awaitable[None]]], closing: trio.Event) -> None:
    """Run every client task; once ``closing`` is set give them ``CLOSE_GRACE`` to end.

    Clients left after the grace time (a handshake or close still pending) are
    cancelled. Cancellation of the caller propagates.
    """
    finished = Ready(len(clients))
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(_run_one, client, finished.token())
        await closing.wait()
        with trio.move_on_after(CLOSE_GRACE):
            await finished.wait()
        nursery.cancel_scope.cancel()


async def _run_one(client: Callable[[], Awaitable[None]], done: Callable[[], None]) -> None:
    try:
        await client()
    finally:
        done()
