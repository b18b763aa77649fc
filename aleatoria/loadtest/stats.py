"""What one run measured: named counters plus latency histograms and time series.

Every worker (thread or process) fills its own ``Stats``; the coordinator merges them.
Counter names are dotted, ``<area>.<figure>`` (``room.lost``, ``conn.failed.refused``,
``error.rate_limited``); the report picks them out by name, and unknown ones are still
printed in ``--json`` so nothing measured is hidden. Latency metrics are named the same
way (``room.delivery``, ``dm.rtt``, ``match.setup``, ``connect``). ``records`` are rows a
check needs from every worker at once (``search``: one row per search, for the fairness
check); each worker keeps at most ``MAX_RECORDS`` rows per name and counts the rest in
``<name>.records_dropped``.
Pure code, no trio.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from aleatoria.loadtest.histogram import Histogram, Timeline

MAX_RECORDS = 200_000  # rows per name and worker (a few hundred bytes each)


class Stats:
    """Counters and latencies of one worker, or of a whole run once merged."""

    def __init__(self, epoch_ns: int) -> None:
        # epoch_ns: the monotonic time the run started; time series are relative to it.
        self.epoch_ns = epoch_ns
        self.counters: Counter[str] = Counter()
        self.histograms: dict[str, Histogram] = {}
        self.timelines: dict[str, Timeline] = {}
        # Samples since the last progress report, for the live display only (not merged).
        self.recent: dict[str, Histogram] = {}
        self.records: dict[str, list[list[Any]]] = {}

    def take_recent(self) -> dict[str, Histogram]:
        recent, self.recent = self.recent, {}
        return recent

    def inc(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def get(self, name: str) -> int:
        return self.counters.get(name, 0)

    def total(self, prefix: str) -> int:
        """Sum of every counter named ``prefix`` or ``prefix.<anything>``."""
        return sum(n for key, n in self.counters.items() if key == prefix or key.startswith(prefix + "."))

    def observe(self, metric: str, latency_ns: int, at_ns: int) -> None:
        """Record one latency sample taken at monotonic time ``at_ns``."""
        value_us = latency_ns // 1000
        hist = self.histograms.get(metric)
        if hist is None:
            hist = self.histograms[metric] = Histogram()
            self.timelines[metric] = Timeline()
        hist.record(value_us)
        self.timelines[metric].record(at_ns - self.epoch_ns, value_us)
        recent = self.recent.get(metric)
        if recent is None:
            recent = self.recent[metric] = Histogram()
        recent.record(value_us)

    def record(self, name: str, row: list[Any]) -> bool:
        """Keep one JSON-ready row under ``name``; False (and counted) once it is full."""
        rows = self.records.setdefault(name, [])
        if len(rows) >= MAX_RECORDS:
            self.inc(f"{name}.records_dropped")
            return False
        rows.append(row)
        return True

    def merge(self, other: Stats) -> None:
        self.counters.update(other.counters)
        for name, rows in other.records.items():
            self.records.setdefault(name, []).extend(rows)
        for metric, hist in other.histograms.items():
            self.histograms.setdefault(metric, Histogram()).merge(hist)
        for metric, timeline in other.timelines.items():
            mine = self.timelines.setdefault(metric, Timeline(timeline.width_ns))
            mine.merge(timeline)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch_ns": self.epoch_ns,
            "counters": dict(self.counters),
            "histograms": {k: h.to_dict() for k, h in self.histograms.items()},
            "timelines": {k: t.to_dict() for k, t in self.timelines.items()},
            "records": self.records,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stats:
        stats = cls(int(data["epoch_ns"]))
        stats.counters.update({str(k): int(v) for k, v in data["counters"].items()})
        stats.histograms = {k: Histogram.from_dict(h) for k, h in data["histograms"].items()}
        stats.timelines = {k: Timeline.from_dict(t) for k, t in data["timelines"].items()}
        stats.records = {str(k): list(rows) for k, rows in data.get("records", {}).items()}
        return stats
