"""The flusher: frames sent during one pass of trio's scheduler leave together after it.

Every ``WebSocket.send`` while a connection has nothing pending marks that connection; one
task then writes every marked connection's frames, back to back, when the tasks that
were runnable with it have run. Two things make that cheaper than writing at once:

- frames for the same socket (a reply and a relay, a room message and a direct message)
  join into one system call;
- on this project's VMs a ``send`` that wakes a sleeping reader costs 32-63 us of CPU, one
  in a burst to 50 connections 7-16 us (``scripts/send_cost.py``, docs/performance.md):
  sends in a burst wake each client's CPU once, not once per frame.

A frame waits until the end of the scheduler pass (the writer is rescheduled by the first
mark and runs in the next batch) or until ``MAX_PENDING`` connections have frames pending,
whichever comes first, or until the connection's pending frames reach its outbox bound
(``outbox_frames`` frames or ``outbox_bytes`` bytes: ``WebSocket.send`` then writes them at
once, and a client not reading meets the backlog's bound, 1013). Control frames that must be
ordered with data (a close) flush the connection's pending frames first
(``WebSocket.close``); pongs wait with the data, in order. A room's broadcaster, a burst
already, writes at once (``WebSocket.send_now``), and so does a match announcement
(``Hub.deliver``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import trio

__all__ = ["Flushable", "Flusher", "open_flusher"]

log = logging.getLogger("aleatoria.flusher")

# Connections pending before the flusher writes at once, in the task that marks the last
# one: bounds how long a frame waits for the rest of a long scheduler pass (each connection
# handled costs ~70 us here). 8, 16, 32 and no limit measured alike in throughput; fewer
# means a shorter wait.
MAX_PENDING = 32


class Flushable(Protocol):
    def flush(self) -> None:
        """Write what is pending (never blocks)."""

    def abort(self) -> None:
        """Drop the connection."""


class Flusher:
    """Connections with frames waiting for the end of this scheduler pass."""

    def __init__(self) -> None:
        self._marked: list[Flushable] = []
        self._writer = trio.lowlevel.ParkingLot()

    def mark(self, connection: Flushable) -> None:
        """``connection`` has frames pending: flush it after this scheduler pass. Call once
        per pending batch (the connection knows when it had nothing pending)."""
        marked = self._marked
        marked.append(connection)
        if len(marked) == 1:
            self._writer.unpark()
        elif len(marked) >= MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        """Write every marked connection's frames now. A failure ends that connection only:
        this runs for all of them."""
        marked, self._marked = self._marked, []
        for connection in marked:
            try:
                connection.flush()
            except Exception:
                log.exception("event=flush_error")
                connection.abort()

    async def run(self) -> None:
        """The writer task: flush marked connections, forever."""
        while True:
            if self._marked:  # marked before this task first ran
                await trio.lowlevel.checkpoint()
            else:
                await self._writer.park()
            self.flush()


@asynccontextmanager
async def open_flusher() -> AsyncIterator[Flusher]:
    """A flusher whose writer task runs until the block exits."""
    async with trio.open_nursery() as nursery:
        flusher = Flusher()
        nursery.start_soon(flusher.run)
        try:
            yield flusher
        finally:
            nursery.cancel_scope.cancel()
