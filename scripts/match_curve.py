#!/usr/bin/env python3
"""Matchmaking latency against load: the reference generator's ``match`` at several user
counts, memory and Redis mode, in one run.

The generator's ``match`` is a closed loop: each of N users asks for a peer, goes through a
call's signalling with it (offer, answer, candidates, hangup) and asks again at once. So the
server is as busy as N users can make it. At 200 users (``side_by_side.py``'s match) both
modes fill the server's core, and a request's latency is the queue ahead of it. This script
shows where that starts. For each user count it gives matches/s, the server's cores, the
match latency (a ``request_random_peer`` to its ``assign_role``), the generator's timeouts
and the re-sent assignments (PROTOCOL.md section 4: a request that crossed an incoming
match), and redis-server's CPU per match. Last comes the highest rate at which each mode
kept its p99 within ``--p99-ms``: the figure to size an instance by.

Like ``side_by_side.py`` it starts no redis-server; give it one of its own:

    redis-server --port 6390 --save '' --appendonly no --daemonize yes
    python scripts/match_curve.py --redis-url redis://127.0.0.1:6390/0 --out /tmp/curve

Each user count is one ``compare.py`` (fresh server per repetition, server on CPU 0,
generator on CPU 1, medians of ``--reps``): about a minute per count with 3 repetitions.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from side_by_side import FLAGS, ROOT, Record, check_bench, cpu_seconds, median_of, run_compare

MODES = ("memory", "redis")
# The generator's figures behind a Point's fields after ``users`` and ``mode``, in order.
_FIGURES = (
    "matches_per_s",
    "server_cpu_util",
    "match_latency.p50_ms",
    "match_latency.p90_ms",
    "match_latency.p99_ms",
    "timeouts",
    "duplicate_assigns",
)


class Point(NamedTuple):
    """One user count in one mode: medians over the repetitions."""

    users: int
    mode: str
    matches_per_s: float
    cores: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    timeouts: float
    resent: float


def points(records: Iterable[Record]) -> list[Point]:
    """The curve's points from ``compare.py``'s records (servers named ``memory`` and
    ``redis``), by user count, then mode."""
    by_users: dict[int, list[Record]] = {}
    for record in records:
        if "error" not in record:  # a failed run has no figures (run_compare refuses them too)
            by_users.setdefault(int(record["users"]), []).append(record)
    return [
        Point(users, mode, *(median_of(group, mode, key) for key in _FIGURES))
        for users, group in sorted(by_users.items())
        for mode in MODES
        if any(record.get("server") == mode for record in group)
    ]


def best_within(found: Sequence[Point], mode: str, p99_ms: float) -> Point | None:
    """The point of ``mode`` with the most matches/s whose p99 is within ``p99_ms``."""
    within = [point for point in found if point.mode == mode and point.p99_ms <= p99_ms]
    return max(within, key=lambda point: point.matches_per_s, default=None)


def render(found: Sequence[Point], p99_ms: float, redis_cpu: Mapping[int, float]) -> str:
    """The curve and its verdict as markdown."""
    lines = [
        "| users | mode | matches/s | server cores | match latency p50 / p90 / p99 ms "
        "| generator timeouts | re-sent assignments | redis-server CPU per match |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for point in found:
        spent = redis_cpu.get(point.users) if point.mode == "redis" else None
        lines.append(
            f"| {point.users} | {point.mode} | {point.matches_per_s:,.0f} | {point.cores:.2f} "
            f"| {point.p50_ms:.1f} / {point.p90_ms:.1f} / {point.p99_ms:.1f} "
            f"| {point.timeouts:.0f} | {point.resent:.0f} | {f'{spent:.0f} us' if spent else '-'} |"
        )
    lines.append("")
    for mode in sorted({point.mode for point in found}, key=MODES.index):
        best = best_within(found, mode, p99_ms)
        if best is None:
            lines.append(f"- {mode}: no user count kept the match latency p99 within {p99_ms:g} ms")
        else:
            lines.append(
                f"- {mode}: up to {best.matches_per_s:,.0f} matches/s with a p99 within {p99_ms:g} ms "
                f"({best.users} users, p99 {best.p99_ms:.1f} ms, {best.cores:.2f} cores)"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--redis-url", help="a redis-server of its own, e.g. redis://127.0.0.1:6390/0 (without: memory only)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for compare.py's JSONL and the report"
    )
    parser.add_argument(
        "--users", default="25,50,100,200", help="user counts, comma-separated (default 25,50,100,200)"
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions per mode and count (default 3)")
    parser.add_argument(
        "--p99-ms", type=float, default=20.0, help="the latency bound to size by (default 20)"
    )
    parser.add_argument("--duration", default="8s", help="each generator run's length (default 8s)")
    parser.add_argument(
        "--bench", type=Path, default=ROOT.parent / "shared" / "bench", help="compare.py's directory"
    )
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs the servers")
    args = parser.parse_args()
    try:
        counts = [int(users) for users in args.users.split(",")]
    except ValueError:
        parser.error(f"--users: comma-separated whole numbers, not {args.users!r}")
    if min(counts) < 2 or args.reps < 1:
        parser.error("--users: at least 2 each (a match takes two); --reps: at least 1")
    check_bench(parser, args.bench)

    serve = (
        f"env PYTHONPATH={shlex.quote(str(ROOT))} {shlex.quote(args.python)} -m aleatoria serve "
        f"--port {{port}} {FLAGS}"
    )
    servers = {"memory": serve}
    redis_pid = None
    if args.redis_url:
        import redis  # only here: memory-only runs need no client

        try:
            redis_pid = int(redis.Redis.from_url(args.redis_url).info("server")["process_id"])
        except (redis.RedisError, OSError) as exc:
            parser.error(f"no redis-server at {args.redis_url} ({exc}); start one of its own first")
        servers["redis"] = f"{serve} --redis-url {args.redis_url}"
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out: cannot create {args.out} ({exc.strerror})")
    started = time.monotonic()
    records: list[Record] = []
    redis_cpu: dict[int, float] = {}
    for users in counts:
        print(f"[{time.monotonic() - started:4.0f} s] match --users {users}", file=sys.stderr, flush=True)
        cpu = cpu_seconds(redis_pid) if redis_pid else 0.0
        found = run_compare(
            args.bench,
            args.out / "match_curve.jsonl",
            servers,
            f"match-{users}=match --users {users} --duration {args.duration}",
            args.reps,
        )
        records += found
        if redis_pid:
            spent_us = (cpu_seconds(redis_pid) - cpu) * 1e6
            work = sum(r["matches_per_s"] * r["duration_s"] for r in found if r["server"] == "redis")
            redis_cpu[users] = spent_us / work
    text = render(points(records), args.p99_ms, redis_cpu)
    (args.out / "report.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
