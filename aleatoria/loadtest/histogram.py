"""Bounded latency histograms and time series.

How this works: a run may last hours and record millions of samples, so nothing keeps
samples. ``Histogram`` is HDR-like: values (microseconds) below 128 get a bucket each;
above that every power of two is split into 64 buckets, so a reported percentile is
within 1.6 % of the true value while a histogram never holds more than a few thousand
keys. ``Timeline`` keeps one histogram per time slice for the "latency over time" plot;
when it would exceed ``max_slices`` it doubles the slice width and merges neighbours,
so it too stays bounded however long the run.
Pure code: no trio, no I/O; both classes round-trip through plain dicts (JSON, pickling
across worker processes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

_EXACT = 128  # values below this are their own bucket
_SUB_BITS = 7  # mantissa kept above _EXACT: 64..127, i.e. 64 buckets per power of two


def _key(value: int) -> int:
    if value < _EXACT:
        return max(value, 0)
    shift = value.bit_length() - _SUB_BITS
    return (shift << _SUB_BITS) | (value >> shift)


def _bounds(key: int) -> tuple[int, int]:
    """Smallest and largest value that fall in bucket ``key``."""
    if key < _EXACT:
        return key, key
    shift = key >> _SUB_BITS
    mantissa = key & (_EXACT - 1)
    return mantissa << shift, ((mantissa + 1) << shift) - 1


class Histogram:
    """Counts of latency samples in microseconds, with exact count, sum, min and max."""

    __slots__ = ("_buckets", "count", "max", "min", "total")

    def __init__(self) -> None:
        self._buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def record(self, value_us: int) -> None:
        value_us = max(value_us, 0)
        key = _key(value_us)
        self._buckets[key] = self._buckets.get(key, 0) + 1
        if self.count == 0 or value_us < self.min:
            self.min = value_us
        self.max = max(self.max, value_us)
        self.count += 1
        self.total += value_us

    def merge(self, other: Histogram) -> None:
        if other.count == 0:
            return
        for key, n in other._buckets.items():
            self._buckets[key] = self._buckets.get(key, 0) + n
        self.min = other.min if self.count == 0 else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    def percentile(self, pct: float) -> int:
        """The value (µs) below or at which ``pct`` percent of samples lie; 0 when empty."""
        if self.count == 0:
            return 0
        rank = max(1, math.ceil(pct / 100.0 * self.count))
        seen = 0
        for key in sorted(self._buckets):
            seen += self._buckets[key]
            if seen >= rank:
                low, high = _bounds(key)
                # The bucket's midpoint, clamped to what was really seen.
                return min(max((low + high) // 2, self.min), self.max)
        return self.max

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def buckets(self) -> Iterator[tuple[int, int, int]]:
        """(low µs, high µs, count) for every non-empty bucket, in value order."""
        for key in sorted(self._buckets):
            low, high = _bounds(key)
            yield low, high, self._buckets[key]

    def summary_ms(self) -> dict[str, float]:
        """count, p50, p90, p99, max and mean, latencies in milliseconds."""
        return {
            "count": self.count,
            "p50": self.percentile(50) / 1000.0,
            "p90": self.percentile(90) / 1000.0,
            "p99": self.percentile(99) / 1000.0,
            "max": self.max / 1000.0,
            "mean": round(self.mean / 1000.0, 3),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "buckets": [[k, n] for k, n in self._buckets.items()],
            "count": self.count,
            "total": self.total,
            "min": self.min,
            "max": self.max,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        hist = cls()
        hist._buckets = {int(k): int(n) for k, n in data["buckets"]}
        hist.count = int(data["count"])
        hist.total = int(data["total"])
        hist.min = int(data["min"])
        hist.max = int(data["max"])
        return hist


class Timeline:
    """One histogram per time slice since a shared epoch, bounded in slice count."""

    __slots__ = ("max_slices", "slices", "width_ns")

    def __init__(self, width_ns: int = 250_000_000, max_slices: int = 480) -> None:
        self.width_ns = width_ns
        self.max_slices = max_slices
        self.slices: dict[int, Histogram] = {}

    def record(self, offset_ns: int, value_us: int) -> None:
        index = max(offset_ns, 0) // self.width_ns
        while index >= self.max_slices:
            self._coarsen()
            index = max(offset_ns, 0) // self.width_ns
        hist = self.slices.get(index)
        if hist is None:
            hist = self.slices[index] = Histogram()
        hist.record(value_us)

    def _coarsen(self) -> None:
        """Double the slice width, merging neighbours: keeps memory bounded on long runs."""
        merged: dict[int, Histogram] = {}
        for index, hist in self.slices.items():
            target = merged.setdefault(index // 2, Histogram())
            target.merge(hist)
        self.slices = merged
        self.width_ns *= 2

    def merge(self, other: Timeline) -> None:
        other_slices = other.slices
        other_width = other.width_ns
        # Widths are the same base times a power of two: bring both to the coarser one.
        while self.width_ns < other_width:
            self._coarsen()
        for index, hist in other_slices.items():
            target_index = index * other_width // self.width_ns
            while target_index >= self.max_slices:
                self._coarsen()
                target_index = index * other_width // self.width_ns
            self.slices.setdefault(target_index, Histogram()).merge(hist)

    def points(self) -> list[tuple[float, Histogram]]:
        """(seconds since the epoch at the slice's start, histogram), in time order."""
        return [(i * self.width_ns / 1e9, self.slices[i]) for i in sorted(self.slices)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "width_ns": self.width_ns,
            "max_slices": self.max_slices,
            "slices": [[i, h.to_dict()] for i, h in self.slices.items()],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Timeline:
        timeline = cls(int(data["width_ns"]), int(data["max_slices"]))
        timeline.slices = {int(i): Histogram.from_dict(h) for i, h in data["slices"]}
        return timeline
