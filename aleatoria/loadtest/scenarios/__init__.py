"""The scenarios, each built from one or more ``Part``s run by ``run_scenario``.

How this works: a part owns a group of clients (rooms, DM pairs, match users, search
users, idle connections). ``run_scenario`` starts every part, waits until all their clients are
ready, runs the load phase, gives each part the drain timeout to see its in-flight
traffic arrive, closes them, and finally lets each part turn what it saw into counters
(loss can only be computed once nothing more can arrive). ``soak`` is simply all three
traffic parts at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from aleatoria.loadtest.context import Ready, RunContext


class Part(Protocol):
    ready: Ready

    async def run(self) -> None:
        """Run every client of the part; return once ``close`` was called and all closed."""

    async def drained(self) -> None:
        """Return once everything sent has arrived (the caller bounds the wait)."""

    def close(self) -> None:
        """Tell every client to close its connection."""

    def account(self) -> None:
        """Add the end-of-run figures (loss…) to the stats. Called after ``run`` returned."""


def build_parts(ctx: RunContext) -> list[Part]:
    # Imported here so that each scenario module stays importable on its own.
    from aleatoria.loadtest.scenarios.conns import ConnsPart
    from aleatoria.loadtest.scenarios.dm import DmPart
    from aleatoria.loadtest.scenarios.fanout import FanoutPart
    from aleatoria.loadtest.scenarios.match import MatchPart
    from aleatoria.loadtest.scenarios.search import SearchPart

    builders: dict[str, list[Callable[[RunContext], Part]]] = {
        "fanout": [FanoutPart],
        "dm": [DmPart],
        "match": [MatchPart],
        "conns": [ConnsPart],
        "soak": [FanoutPart, DmPart, MatchPart],
        "search": [SearchPart],
    }
    return [build(ctx) for build in builders[ctx.options.scenario]]


async def run_scenario(ctx: RunContext) -> None:
    """Run ``ctx.options.scenario`` through all phases; see the module docstring.

    A stop request (``ctx.request_stop``) ends the connecting or load phase early; the
    drain still happens. Cancellation propagates (and skips the accounting).
    """
    parts = build_parts(ctx)
    everyone = Ready(len(parts))
    async with trio.open_nursery() as nursery:
        for part in parts:
            nursery.start_soon(part.run)

        async def part_ready(part: Part, arrive: Callable[[], None]) -> None:
            await part.ready.wait()
            arrive()

        for part in parts:
            nursery.start_soon(part_ready, part, everyone.token())
        await ctx.wait_ready(everyone)
        if ctx.open_connections == 0:
            # Nothing to load: do not sit out the duration (a stopped or absent server).
            ctx.stats.inc("run.no_connections")
            ctx.request_stop()
        await ctx.run_load_phase()
        with trio.move_on_after(ctx.options.drain_timeout) as drain:
            for part in parts:
                await part.drained()
        if drain.cancelled_caught:
            ctx.stats.inc("run.drain_timeouts")
        ctx.phase = "closing"
        for part in parts:
            part.close()
    for part in parts:
        part.account()
    ctx.phase = "done"
