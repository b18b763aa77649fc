"""The live progress display: a rich panel on a terminal, plain lines otherwise.

Both show the same few figures, summed over the workers: phase, time, open
connections, messages out and deliveries per second since the last update, latency
p50/p99 over that interval, and error counts. Loss cannot be shown live — a message
not seen yet may still be in flight — it is known only after the drain.
"""

from __future__ import annotations

import time
from typing import Any, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from aleatoria.loadtest.results import ProgressView

# The latency each scenario is about (``stats.observe`` names); tests/test_loadtest.py holds
# every scenario the CLI accepts to have one.
PRIMARY = {
    "fanout": "room.delivery",
    "dm": "dm.rtt",
    "match": "match.setup",
    "conns": "connect",
    "soak": "room.delivery",
    "search": "search.wait",
}


def _outgoing(counters: dict[str, int]) -> int:
    return sum(counters.get(k, 0) for k in ("room.sent", "dm.sent", "dm.replies"))


def _deliveries(counters: dict[str, int]) -> int:
    return sum(counters.get(k, 0) for k in ("room.delivered", "dm.delivered"))


def _errors(counters: dict[str, int]) -> int:
    return sum(
        n for k, n in counters.items() if k.startswith(("error.", "conn.failed", "conn.closed_by_server"))
    )


class _Rates:
    """Per-second rates of a few counters between two updates."""

    def __init__(self) -> None:
        self._last: tuple[float, int, int, int] | None = None

    def update(self, counters: dict[str, int]) -> tuple[float, float, float]:
        now = time.monotonic()
        out, delivered = _outgoing(counters), _deliveries(counters)
        matches = counters.get("match.completed", 0) + counters.get("search.matches", 0)
        rates = (0.0, 0.0, 0.0)
        if self._last is not None and now > self._last[0]:
            span = now - self._last[0]
            rates = (
                (out - self._last[1]) / span,
                (delivered - self._last[2]) / span,
                (matches - self._last[3]) / span,
            )
        self._last = (now, out, delivered, matches)
        return rates


def describe(view: ProgressView, rates: tuple[float, float, float]) -> dict[str, Any]:
    metric = PRIMARY[view.options.scenario]
    recent = view.recent.get(metric)
    return {
        "phase": view.phase + (" (stopping)" if view.interrupted else ""),
        "time": f"{view.load_elapsed_s:.0f}/{view.options.duration:.0f}s",
        "open": view.open_connections,
        "out/s": f"{rates[0]:,.0f}",
        "delivered/s": f"{rates[1]:,.0f}",
        "matches/s": f"{rates[2]:,.1f}",
        f"{metric} p50/p99 ms": (
            f"{recent.percentile(50) / 1000:.2f}/{recent.percentile(99) / 1000:.2f}"
            if recent and recent.count
            else "-"
        ),
        "errors": _errors(view.counters),
    }


class LiveDisplay:
    """rich ``Live`` panel on the terminal (stderr), for a TTY."""

    def __init__(self, console: Console) -> None:
        self._live = Live(console=console, refresh_per_second=4, transient=False)
        self._rates = _Rates()

    def __enter__(self) -> LiveDisplay:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(None, None, None)

    def update(self, view: ProgressView) -> None:
        figures = describe(view, self._rates.update(view.counters))
        table = Table(title=f"aleatoria load test: {view.options.scenario}", title_justify="left")
        for key in figures:
            table.add_column(key, justify="right")
        table.add_row(*(str(v) for v in figures.values()))
        self._live.update(table)


class LineDisplay:
    """One plain line every ``interval`` seconds, for logs and pipes."""

    def __init__(self, stream: TextIO, interval: float) -> None:
        self._stream = stream
        self._interval = interval
        self._next = 0.0
        self._rates = _Rates()

    def __enter__(self) -> LineDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, view: ProgressView) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._interval
        figures = describe(view, self._rates.update(view.counters))
        self._stream.write("progress " + " ".join(f"{k}={v}" for k, v in figures.items()) + "\n")
        self._stream.flush()
