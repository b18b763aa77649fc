#!/usr/bin/env python3
"""The speed targets' side-by-side run: floors and Aleatoria, memory and Redis mode, in one run.

Every speed target is a ratio between two figures of the same run (the machine is shared and
differs by 2x from one run to the next), so this runs them together and prints each ratio:

1. ``scripts/echo_floor.py`` three times (CPU per message of a bare trio echo);
2. ``compare.py`` (the reference generator's side-by-side runner, ``../shared/bench``) with
   ``dm --pairs 50`` on ``scripts/dm_floor.py``, Aleatoria in memory mode and in Redis mode;
3. ``compare.py`` with fan-out 1x500, fan-out 10x50 and match 200, memory and Redis mode,
   then match 200 on ``scripts/match_floor.py`` without and with Redis (the latency and the
   generator timeouts a bare matchmaker reaches on this core);
4. ``compare.py`` with 5,000 connections on ``scripts/handshake_floor.py --h11`` and Aleatoria;
5. ``echo_floor.py`` three times more (the echo figure is the median of the six).

Each ``compare.py`` starts a fresh server per repetition (server on CPU 0, generator on CPU
1, order rotated) and keeps medians of ``--reps``. redis-server's own CPU (from ``/proc``) is
read around each step and reported per unit of the Redis-mode runs' work. The match figures
come from the generator's JSON: ``match_latency`` (a request to its ``assign_role``, the
target's "match p99") is not in compare.py's table, which shows the relay latency.

It starts no redis-server: give it one of its own (the servers under test write to the
database ``--redis-url`` names; nothing is flushed):

    redis-server --port 6390 --save '' --appendonly no --daemonize yes
    python scripts/side_by_side.py --redis-url redis://127.0.0.1:6390/0 --out /tmp/sbs

The reference generator must be built first (``../shared/bench/README.md``). One run takes
about 7 minutes; ``--runs 3`` gives the three side by sides a target needs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
# The server's limits off: the generator is one address sending as fast as it can.
FLAGS = "--rate-limit 0 --allowed-origin * --log-level warning --match-rate 0 --max-connections-per-ip 0"
ECHO_RUNS = 3
_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
_UNITS = {"round_trips_per_s": "round trip", "deliveries_per_s": "delivery", "matches_per_s": "match"}
_ECHO_FIGURE = re.compile(r"([\d.]+) us CPU per message")

Record = Mapping[str, Any]


class Target(NamedTuple):
    """One row of the verdict: what is compared, the figure, the bound, and whether it holds."""

    name: str
    figure: float
    bound: str
    holds: bool
    detail: str = ""


def median_of(records: Iterable[Record], server: str, key: str) -> float:
    """The median over repetitions of ``key`` (dotted: ``match_latency.p99_ms``) for one server."""
    values = []
    for record in records:
        if record.get("server") != server or "error" in record:
            continue
        value: Any = record
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            values.append(float(value))
    if not values:
        raise ValueError(f"no {key} for {server}")
    return statistics.median(values)


def total(records: Iterable[Record], keys: Iterable[str]) -> int:
    """The sum of counters (losses, reorders, double matches) over every run given."""
    wanted = tuple(keys)
    return sum(int(record.get(key) or 0) for record in records for key in wanted)


def targets(echo_us: float, results: Mapping[str, list[Record]]) -> list[Target]:
    """Issue 18's targets from one run: ``echo_us`` (the echo floor's median) and
    ``compare.py``'s records by scenario (``dm``, ``fanout-1x500``, ``fanout-10x50``,
    ``match``, ``match-floor``, ``conns``), servers named as this script names them."""
    dm, match, conns, floors = results["dm"], results["match"], results["conns"], results["match-floor"]
    fan10 = results["fanout-10x50"]
    per_rt = "server_cpu_us_per_round_trip"
    dm_floor = median_of(dm, "dm-floor", per_rt)
    dm_memory = median_of(dm, "memory", per_rt)
    dm_redis = median_of(dm, "redis", per_rt)
    connect = median_of(conns, "memory", "server_cpu_us_per_connect")
    h11 = median_of(conns, "h11-floor", "server_cpu_us_per_connect")
    idle = median_of(conns, "memory", "server_bytes_per_conn")
    per_delivery = "server_cpu_us_per_delivery"
    fan_ratio = median_of(fan10, "memory", per_delivery) / median_of(fan10, "redis", per_delivery)
    match_ratio = median_of(match, "redis", "matches_per_s") / median_of(match, "memory", "matches_per_s")
    p99 = median_of(match, "redis", "match_latency.p99_ms")
    timeouts = median_of(match, "redis", "timeouts")

    def floor_figures(key: str) -> str:
        """The match floors' ``key``, as the detail of a match target prints it."""
        redis, memory = median_of(floors, "floor-redis", key), median_of(floors, "floor", key)
        digits = 0 if key == "timeouts" else 1
        return f"the match floor alone {redis:.{digits}f} in Redis, {memory:.{digits}f} in memory"

    every = [record for records in results.values() for record in records]
    faults = total(every, ("lost", "lost_round_trips", "order_violations", "double_matches"))
    return [
        Target(
            "DM round trip / echo floor",
            dm_memory / echo_us,
            "<= 4.5x",
            dm_memory / echo_us <= 4.5,
            f"{dm_memory:.1f} / {echo_us:.1f} us; the DM floor alone {dm_floor / echo_us:.2f}x",
        ),
        Target(
            "connect / h11 floor",
            connect / h11,
            "<= 1.15x",
            connect / h11 <= 1.15,
            f"{connect:.0f} / {h11:.0f} us",
        ),
        Target("idle memory per connection (KB)", idle / 1000, "<= 7", idle <= 7000),
        Target("Redis DM / memory", dm_memory / dm_redis, ">= 0.8x", dm_memory / dm_redis >= 0.8),
        Target("Redis fan-out 10x50 / memory", fan_ratio, ">= 0.8x", fan_ratio >= 0.8),
        Target("Redis match / memory", match_ratio, ">= 0.5x", match_ratio >= 0.5),
        Target(
            "Redis match latency p99 (ms)",
            p99,
            "<= 20",
            p99 <= 20,
            f"memory mode {median_of(match, 'memory', 'match_latency.p99_ms'):.1f}; "
            + floor_figures("match_latency.p99_ms"),
        ),
        Target(
            "Redis match generator timeouts",
            timeouts,
            "0",
            timeouts == 0,
            f"memory mode {median_of(match, 'memory', 'timeouts'):.0f}; " + floor_figures("timeouts"),
        ),
        Target("lost, reordered, double matched (all runs)", faults, "0", faults == 0),
    ]


def render(
    run: int, echo: list[float], results: Mapping[str, list[Record]], redis_cpu: Mapping[str, str]
) -> str:
    """One run's figures and verdict as markdown."""
    echo_us = statistics.median(echo)
    redis_cpu = dict(redis_cpu)
    lines = [
        f"## Run {run}",
        "",
        f"echo floor: {echo_us:.1f} us per message (median of {', '.join(f'{e:.1f}' for e in echo)})",
        "",
        "| target | figure | bound | holds | detail |",
        "|---|---|---|---|---|",
    ]
    for target in targets(echo_us, results):
        mark = "yes" if target.holds else "**no**"
        # Three significant digits: a ratio of 0.797 must not print as the bound it misses.
        lines.append(f"| {target.name} | {target.figure:.3g} | {target.bound} | {mark} | {target.detail} |")
    lines += ["", "| scenario | figure | memory | Redis | redis-server's CPU |", "|---|---|---|---|---|"]
    for scenario, key, unit in (
        ("dm", "server_cpu_us_per_round_trip", "us per round trip"),
        ("fanout-1x500", "server_cpu_us_per_delivery", "us per delivery"),
        ("fanout-10x50", "server_cpu_us_per_delivery", "us per delivery"),
        ("match", "matches_per_s", "matches/s"),
        ("match", "match_latency.p50_ms", "match latency p50 ms"),
        ("match", "relay_latency.p99_ms", "relay latency p99 ms"),
        ("conns", "server_cpu_us_per_connect", "us per connect"),
    ):
        records = results[scenario]
        memory = median_of(records, "memory", key)
        redis = f"{median_of(records, 'redis', key):.2f}" if scenario != "conns" else "-"
        spent = redis_cpu.pop(scenario, "-")  # once per scenario
        lines.append(f"| {scenario} | {unit} | {memory:.2f} | {redis} | {spent} |")
    return "\n".join(lines)


# -- running -----------------------------------------------------------------------------------


def _echo_floor(python: str) -> float:
    out = subprocess.run(
        [python, str(ROOT / "scripts" / "echo_floor.py"), "4"], capture_output=True, text=True, check=True
    )
    found = _ECHO_FIGURE.findall(out.stdout + out.stderr)
    if not found:
        raise RuntimeError(f"echo_floor.py printed no figure:\n{out.stdout}{out.stderr}")
    return float(found[-1])


def check_bench(parser: argparse.ArgumentParser, bench: Path) -> None:
    """Exit with a clear message unless ``compare.py`` and the built generator are there."""
    # Where compare.py looks for the generator.
    build = os.environ.get("BENCH_BUILD", "/tmp/aleatoria-bench")
    loadgen = Path(os.environ.get("LOADGEN") or Path(build, "bin", "loadgen"))
    if not (bench / "compare.py").exists():
        parser.error(f"no compare.py in {bench}: give --bench the reference generator's directory")
    if not loadgen.exists():
        parser.error(f"no reference generator at {loadgen}: build it ({bench / 'README.md'})")


def cpu_seconds(pid: int) -> float:
    """The CPU a process (redis-server) has used so far: user and system time, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_SECOND  # utime + stime


def run_compare(bench: Path, out: Path, servers: dict[str, str], scenario: str, reps: int) -> list[Record]:
    """Run compare.py for one scenario; its records (appended to ``out``)."""
    before = out.read_text().count("\n") if out.exists() else 0
    command = [
        sys.executable,
        str(bench / "compare.py"),
        "--reps",
        str(reps),
        "--out",
        str(out),
        "--quiet-lg",
    ]
    for name, server in servers.items():
        command += ["--server", f"{name}={server}"]
    command += ["--scenario", scenario]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    lines = out.read_text().splitlines()[before:]
    records = [json.loads(line) for line in lines if line.strip()]
    failed = [record for record in records if "error" in record]
    if failed:
        raise RuntimeError(f"{len(failed)} runs failed: {failed[0]['error']}")
    return records


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--redis-url", required=True, help="a redis-server of its own, e.g. redis://127.0.0.1:6390/0"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for compare.py's JSONL and the report"
    )
    parser.add_argument("--runs", type=int, default=1, help="side by sides, one after another (default 1)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per server and scenario (default 3)")
    parser.add_argument(
        "--bench", type=Path, default=ROOT.parent / "shared" / "bench", help="compare.py's directory"
    )
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs the servers")
    args = parser.parse_args()
    if args.runs < 1 or args.reps < 1:
        parser.error("--runs and --reps must be at least 1")

    import redis  # only here: the summary above needs no client

    check_bench(parser, args.bench)
    try:
        redis_pid = int(redis.Redis.from_url(args.redis_url).info("server")["process_id"])
    except (redis.RedisError, OSError) as exc:
        parser.error(f"no redis-server at {args.redis_url} ({exc}); start one of its own first")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out: cannot create {args.out} ({exc.strerror})")
    python = shlex.quote(args.python)
    serve = f"env PYTHONPATH={shlex.quote(str(ROOT))} {python} -m aleatoria serve --port {{port}} {FLAGS}"
    memory, in_redis = serve, f"{serve} --redis-url {args.redis_url}"
    scripts = ROOT / "scripts"
    match_floor = f"{python} {scripts / 'match_floor.py'} --port {{port}}"
    # (name, servers, compare.py scenario, the Redis runs' unit of work for redis-server's CPU)
    steps: list[tuple[str, dict[str, str], str, str | None]] = [
        (
            "dm",
            {
                "dm-floor": f"{python} {scripts / 'dm_floor.py'} --port {{port}}",
                "memory": memory,
                "redis": in_redis,
            },
            "dm=dm --pairs 50 --duration 8s",
            "round_trips_per_s",
        ),
        (
            "fanout-1x500",
            {"memory": memory, "redis": in_redis},
            "fanout-1x500=fanout --rooms 1 --members 500 --senders 1 --window 4 --duration 8s",
            "deliveries_per_s",
        ),
        (
            "fanout-10x50",
            {"memory": memory, "redis": in_redis},
            "fanout-10x50=fanout --rooms 10 --members 50 --senders 2 --window 4 --duration 8s",
            "deliveries_per_s",
        ),
        (
            "match",
            {"memory": memory, "redis": in_redis},
            "match=match --users 200 --duration 8s",
            "matches_per_s",
        ),
        (
            # Its own step: redis-server's CPU above is Aleatoria's alone.
            "match-floor",
            {
                "floor": match_floor,
                "floor-redis": f"{match_floor} --redis-url {args.redis_url}",
            },
            "match=match --users 200 --duration 8s",
            None,
        ),
        (
            "conns",
            {
                "h11-floor": f"{python} {scripts / 'handshake_floor.py'} --port {{port}} --h11",
                "memory": memory,
            },
            "conns=conns --n 5000 --hold 2s",
            None,
        ),
    ]
    report = args.out / "report.md"
    for run in range(1, args.runs + 1):
        started = time.monotonic()

        def say(what: str, run: int = run, started: float = started) -> None:
            print(
                f"[run {run}/{args.runs}, {time.monotonic() - started:4.0f} s] {what}",
                file=sys.stderr,
                flush=True,
            )

        say("echo floor")
        echo = [_echo_floor(args.python) for _ in range(ECHO_RUNS)]
        results: dict[str, list[Record]] = {}
        redis_cpu: dict[str, str] = {}
        for name, servers, scenario, unit in steps:
            say(name)
            cpu = cpu_seconds(redis_pid)
            records = run_compare(
                args.bench, args.out / f"run{run}-{name}.jsonl", servers, scenario, args.reps
            )
            results[name] = records
            if unit is not None:
                spent_us = (cpu_seconds(redis_pid) - cpu) * 1e6
                work = sum(r[unit] * r["duration_s"] for r in records if r["server"] == "redis")
                redis_cpu[name] = f"{spent_us / work:.2f} us per {_UNITS[unit]}"
        say("echo floor")
        echo += [_echo_floor(args.python) for _ in range(ECHO_RUNS)]
        text = render(run, echo, results, redis_cpu)
        with report.open("a") as f:
            f.write(text + "\n\n")
        print(text + "\n", flush=True)
    print(f"report: {report}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
