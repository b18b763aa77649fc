"""Per-stream delivery bookkeeping: loss, duplicates and order violations.

How this works: every sender numbers its messages 0, 1, 2, … and each receiver keeps
one ``SequenceTracker`` per sender it hears from. The tracker remembers the highest
number seen and the "holes" below it (numbers skipped so far). A number that fills a
hole arrived late: an order violation. A number at or below the high mark that is not
a hole was seen before: a duplicate. After the run, ``missing(sent)`` is what never
arrived. Holes are capped so that a server dropping most messages cannot make the
tracker grow without bound; a number not remembered as a hole still counts as missing,
but should it arrive late after all it is reported as a duplicate rather than as late.
Pure code, no I/O.
"""

from __future__ import annotations

import enum

MAX_HOLES = 10_000


class Arrival(enum.Enum):
    IN_ORDER = "in_order"
    LATE = "late"  # filled a hole: delivered after a higher number from the same sender
    DUPLICATE = "duplicate"


class SequenceTracker:
    """What one receiver has seen of one sender's numbered messages."""

    __slots__ = ("duplicates", "high", "holes", "late", "unique")

    def __init__(self) -> None:
        self.high = -1
        self.unique = 0
        self.duplicates = 0
        self.late = 0
        self.holes: set[int] = set()

    def observe(self, seq: int) -> Arrival:
        if seq > self.high:
            if seq > self.high + 1 and len(self.holes) < MAX_HOLES:
                # Bounded: a huge gap records only as many holes as the cap allows.
                room = MAX_HOLES - len(self.holes)
                self.holes.update(range(max(self.high + 1, seq - room), seq))
            self.high = seq
            self.unique += 1
            return Arrival.IN_ORDER
        if seq in self.holes:
            self.holes.discard(seq)
            self.unique += 1
            self.late += 1
            return Arrival.LATE
        self.duplicates += 1
        return Arrival.DUPLICATE

    def missing(self, sent: int) -> int:
        """How many of the ``sent`` messages (numbers 0..sent-1) never arrived."""
        return max(sent - self.unique, 0)
