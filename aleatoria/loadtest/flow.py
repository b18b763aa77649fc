"""Flow control for senders: an in-flight window and a steady-rate pacer.

Both wait on trio primitives only and give up promptly when the load phase ends, so a
sender never blocks the drain. A sender's window closes when ``size`` messages are
unconfirmed; it reopens as confirmations arrive. A confirmation for number ``n`` also
settles every earlier number (the server delivers in order), so one dropped message
does not keep a slot forever; if nothing is confirmed for ``timeout`` seconds, the
window is reset and the caller counts a window timeout.
"""

from __future__ import annotations

import math

import trio


class Window:
    """At most ``size`` unconfirmed messages per sender."""

    def __init__(self, size: int, reset_after: float) -> None:
        self.size = size
        self.reset_after = reset_after
        self.next_seq = 0  # the number the next message gets
        self.outstanding = 0
        self.timeouts = 0  # resets after ``timeout`` without a confirmation
        self._wake = trio.Event()

    def take(self) -> int:
        """Number the next message and count it in flight."""
        seq = self.next_seq
        self.next_seq += 1
        self.outstanding += 1
        return seq

    def confirm(self, seq: int) -> None:
        """Message ``seq`` came back: it and everything sent before it are settled."""
        self.outstanding = max(0, min(self.outstanding - 1, self.next_seq - 1 - seq))
        self._wake.set()

    def forget_one(self) -> None:
        """A message will never be confirmed (the server refused it)."""
        self.outstanding = max(0, self.outstanding - 1)
        self._wake.set()

    def wake(self) -> None:
        """Wake a waiting sender (used when the load phase ends)."""
        self._wake.set()

    async def wait_open(self, stop: trio.Event) -> bool:
        """Wait until a slot is free; False if ``stop`` got set.

        ``reset_after`` seconds without any confirmation reset the window (counted in
        ``timeouts``): the unconfirmed messages are taken as lost, sending resumes.
        """
        while self.outstanding >= self.size and not stop.is_set():
            self._wake = trio.Event()
            with trio.move_on_after(self.reset_after) as scope:
                await self._wake.wait()
            if scope.cancelled_caught:
                self.timeouts += 1
                self.outstanding = 0
        return not stop.is_set()


class Pacer:
    """Spaces a sender's messages ``interval`` seconds apart (0: no pacing).

    Open-loop: the schedule does not slow down when the server does, which is what a
    steady-rate soak needs. A sender that fell more than one interval behind restarts
    its schedule instead of bursting to catch up, and the skipped slots are counted.
    """

    def __init__(self, interval: float, phase: float = 0.0) -> None:
        self.interval = interval
        self._next = math.nan
        self._phase = phase  # spreads many senders' first sends over one interval
        self.skipped = 0

    async def wait_turn(self, stop: trio.Event) -> bool:
        """Sleep until the next slot; False if ``stop`` got set meanwhile."""
        if self.interval <= 0:
            return not stop.is_set()
        now = trio.current_time()
        if math.isnan(self._next):
            self._next = now + self._phase * self.interval
        elif self._next < now - self.interval:
            self.skipped += int((now - self._next) / self.interval)
            self._next = now
        with trio.move_on_at(self._next):
            await stop.wait()
        self._next += self.interval
        return not stop.is_set()


class Pending:
    """Deliveries expected but not seen yet, and a wait until there are none (the drain)."""

    def __init__(self) -> None:
        self.count = 0
        self._draining = False
        self._drained = trio.Event()

    def expect(self, count: int = 1) -> None:
        self.count += count

    def settle(self, count: int = 1) -> None:
        self.count -= count
        if self._draining and self.count <= 0:
            self._drained.set()

    async def drained(self) -> None:
        """Wait until every expected delivery is settled (the caller bounds the wait)."""
        self._draining = True
        if self.count > 0:
            await self._drained.wait()
