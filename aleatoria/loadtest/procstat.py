"""CPU and memory of the server under test (``--server-pid``) and of the machine, from /proc.

Linux only; on anything else, or when the process is gone, a sample is None and the
report leaves those figures out. The server's figures include its child processes
(``aleatoria serve --workers N``): the tree is found through ``/proc/*/stat``'s parent
field, re-read at each sample since workers may come and go.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ProcSample(NamedTuple):
    at: float  # time.monotonic()
    cpu_s: float  # user + system CPU seconds of the process tree so far
    rss_bytes: int
    processes: int


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after it.
    return text[text.rindex(")") + 2 :].split()


def _rss_bytes(pid: int) -> int:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants that exist now."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def sample_process(pid: int) -> ProcSample | None:
    """CPU seconds and RSS of ``pid`` and its descendants; None if ``pid`` is gone."""
    if _stat_fields(pid) is None:
        return None
    cpu = 0.0
    rss = 0
    count = 0
    for member in process_tree(pid):
        fields = _stat_fields(member)
        if fields is None:
            continue
        # Fields 14 and 15 of stat (utime, stime); index 11 and 12 after the name.
        cpu += (int(fields[11]) + int(fields[12])) / _TICKS
        rss += _rss_bytes(member)
        count += 1
    return ProcSample(time.monotonic(), cpu, rss, count)


def machine_cpu() -> tuple[float, float] | None:
    """(busy, total) jiffies of all cores since boot, or None off Linux."""
    try:
        line = (PROC / "stat").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    values = [float(v) for v in line.split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user/nice
    return total - idle, total


class ServerMonitor:
    """Samples ``--server-pid`` during the run and summarises it for the report."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.first: ProcSample | None = None
        self.last: ProcSample | None = None
        self.at_load: ProcSample | None = None
        self.peak_rss = 0
        self.peak_processes = 0

    def sample(self, *, load_started: bool = False) -> None:
        current = sample_process(self.pid)
        if current is None:
            return
        if self.first is None:
            self.first = current
        if load_started and self.at_load is None:
            self.at_load = current
        self.last = current
        self.peak_rss = max(self.peak_rss, current.rss_bytes)
        self.peak_processes = max(self.peak_processes, current.processes)

    def summary(self, opened: int) -> dict[str, float | int | None]:
        if self.first is None or self.last is None:
            return {"pid": self.pid, "available": False}
        wall = max(self.last.at - self.first.at, 1e-9)
        mib = 1024.0 * 1024.0
        per_conn: float | None = None
        if self.at_load is not None and opened > 0:
            per_conn = (self.at_load.rss_bytes - self.first.rss_bytes) / opened / 1024.0
        return {
            "pid": self.pid,
            "available": True,
            "processes": self.peak_processes,
            "cpu_cores": round((self.last.cpu_s - self.first.cpu_s) / wall, 3),
            "rss_start_mib": round(self.first.rss_bytes / mib, 1),
            "rss_peak_mib": round(self.peak_rss / mib, 1),
            "rss_end_mib": round(self.last.rss_bytes / mib, 1),
            "rss_per_connection_kib": None if per_conn is None else round(per_conn, 2),
        }
