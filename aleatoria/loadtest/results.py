"""The data that flows from a run to its reports: the live view and the final result."""

from __future__ import annotations

from typing import Any, Protocol

import attrs

from aleatoria.loadtest.histogram import Histogram
from aleatoria.loadtest.options import Options
from aleatoria.loadtest.stats import Stats


class Display(Protocol):
    def update(self, view: ProgressView) -> None: ...


@attrs.define
class ProgressView:
    """Everything the live display shows, summed over the workers."""

    options: Options
    elapsed_s: float
    load_elapsed_s: float
    phase: str
    open_connections: int
    counters: dict[str, int]
    recent: dict[str, Histogram]
    interrupted: bool


@attrs.define
class RunResult:
    """A finished (or partial) run: merged stats plus what the coordinator observed."""

    options: Options
    stats: Stats
    workers: list[dict[str, Any]]
    interrupted: bool = False
    missing_workers: int = 0  # workers that never reported (aborted run)
    wall_s: float = 0.0
    server: dict[str, Any] | None = None
    machine_busy: float | None = None  # share of all cores busy during the run
