"""``--plot FILE.png``: latency over time (p50 and p99 per metric) and latency histograms.

matplotlib is imported only here and only when a plot is asked for, with the Agg
backend, so the tool works without a display and without matplotlib for other runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aleatoria.loadtest.stats import Stats


def plot_metrics(stats: Stats) -> list[str]:
    """The latency metrics worth plotting: all but the tool's own loop lag."""
    return [
        name
        for name, hist in sorted(stats.histograms.items())
        if hist.count and not name.startswith("generator.")
    ]


def _range_ms(stats: Stats, metrics: list[str]) -> tuple[float, float]:
    """The latency span to draw, in ms: from the smallest to the largest sample, > 0."""
    lows = [stats.histograms[m].min for m in metrics]
    highs = [stats.histograms[m].max for m in metrics]
    low = max(min(lows, default=1) / 1000, 0.01)
    high = max(max(highs, default=1000) / 1000, low * 10)
    return low, high


def plot_path_problem(path: Path) -> str | None:
    """Why ``path`` cannot take the plot, or None: checked before the run, so a long run
    does not end without its plot. matplotlib adds ``.png`` to a name without a suffix and
    writes a directory's name plus ``.png``, so both are refused rather than written elsewhere."""
    if path.is_dir():
        return f"--plot {str(path)!r} is a directory: give a file name such as latency.png"
    if not path.suffix:
        return f"--plot {str(path)!r} has no suffix: give a file name such as latency.png"
    parent = path.parent
    if not parent.is_dir():
        return f"--plot: no directory {str(parent)!r} to write {path.name!r} in"
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"--plot {str(path)!r} cannot be written (permission denied)"
    return None


def write_plot(stats: Stats, path: Path, title: str) -> None:
    """Write a two-panel PNG to ``path``. Raises OSError if it cannot be written, ImportError
    without matplotlib."""
    import matplotlib.pyplot as plt

    figure = draw(stats, title)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def draw(stats: Stats, title: str) -> Any:
    """The two-panel figure (a matplotlib ``Figure``; the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = plot_metrics(stats)
    figure, (over_time, histogram) = plt.subplots(2, 1, figsize=(11, 8))
    figure.suptitle(title)
    low_ms, high_ms = _range_ms(stats, metrics)
    # The histogram's own buckets are far finer than a picture needs: regroup them into
    # 50 log-spaced bins shared by every metric, so the curves can be compared.
    edges = [low_ms * (high_ms / low_ms) ** (i / 50) for i in range(51)]
    for index, name in enumerate(metrics):
        colour = f"C{index % 10}"
        points = stats.timelines[name].points()
        if points:  # a metric seen in one time slot only (connect, often) is a dot, not a line
            times = [t for t, _ in points]
            p50 = [h.percentile(50) / 1000 for _, h in points]
            p99 = [h.percentile(99) / 1000 for _, h in points]
            marker = "o" if len(points) == 1 else None
            over_time.plot(times, p50, color=colour, marker=marker, label=f"{name} p50")
            over_time.plot(times, p99, color=colour, marker=marker, linestyle="--", label=f"{name} p99")
        middles, shares = [], []
        total = stats.histograms[name].count
        for low, high, count in stats.histograms[name].buckets():
            middles.append(min(max((low + high) / 2000, low_ms), high_ms))
            shares.append(count / total)
        # Shares, not counts: 200 connects and 150,000 deliveries are both visible.
        histogram.hist(middles, bins=edges, weights=shares, histtype="step", color=colour, label=name)
    over_time.set_xlabel("time since start (s)")
    over_time.set_ylabel("latency (ms)")
    over_time.set_yscale("log")
    over_time.set_title("latency over time (solid p50, dashed p99)")
    histogram.set_xlabel("latency (ms)")
    histogram.set_ylabel("share of the metric's samples")
    histogram.set_xscale("log")
    histogram.set_title("latency histogram")
    if metrics:
        over_time.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        histogram.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        over_time.text(0.5, 0.5, "no latency samples", ha="center", transform=over_time.transAxes)
    figure.tight_layout()
    return figure
