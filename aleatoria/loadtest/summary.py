"""Turn a ``RunResult`` into the figures the report prints: one JSON-ready dict.

This is where raw counters become the published figures (rates, totals, the
integrity verdict) and where the warnings are decided, so the table, ``--json`` and
the exit code can never disagree. Pure code.
"""

from __future__ import annotations

from typing import Any

from aleatoria.loadtest.options import Options
from aleatoria.loadtest.results import RunResult
from aleatoria.loadtest.searchcheck import Rules, analyse
from aleatoria.loadtest.stats import Stats

# Above this share of one core, the event loop itself was the bottleneck.
CPU_SATURATED = 0.9
LOOP_LAG_WARN_MS = 50.0
MACHINE_BUSY_WARN = 0.95

# Counters whose any non-zero value means the server broke the protocol's guarantees.
INTEGRITY = (
    "room.lost",
    "room.duplicated",
    "room.reordered",
    "dm.lost",
    "dm.duplicated",
    "dm.reordered",
    "dm.bad_incoming_flag",
    "match.double",
    "match.mismatch",
    "match.incomplete",
    "search.double",
    "search.mismatch",
)
# The search scenario's run-wide checks (``searchcheck``) that count as violations.
SEARCH_INTEGRITY = {
    "pairing_mismatches": "search.pairing",
    "rematches": "search.rematch",
    "unfair": "search.unfair",
}


def _by_prefix(stats: Stats, prefix: str) -> dict[str, int]:
    return {
        key[len(prefix) :]: n for key, n in sorted(stats.counters.items()) if key.startswith(prefix) and n
    }


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def _traffic(stats: Stats, area: str, seconds: float) -> dict[str, Any]:
    names = (
        "sent",
        "replies",
        "delivered",
        "expected",
        "lost",
        "duplicated",
        "reordered",
        "refused",
        "window_timeouts",
        "pacer_skipped",
        "foreign",
        "bad_incoming_flag",
    )
    figures: dict[str, Any] = {name: stats.get(f"{area}.{name}") for name in names}
    if area != "dm":
        del figures["replies"], figures["bad_incoming_flag"]
    figures["send_rate"] = _rate(figures["sent"] + figures.get("replies", 0), seconds)
    figures["delivery_rate"] = _rate(figures["delivered"], seconds)
    return figures


def summarize(result: RunResult) -> dict[str, Any]:
    """Every figure of the run, nested by topic; see docs/loadtest.md for each."""
    stats = result.stats
    options = result.options
    load_s = max((float(w.get("load_s") or 0.0) for w in result.workers), default=0.0)
    partial = result.interrupted or result.missing_workers > 0
    scenario = options.scenario
    areas = {"fanout": ["room"], "dm": ["dm"], "soak": ["room", "dm"]}.get(scenario, [])
    lag = stats.histograms.get("generator.loop_lag")
    figures: dict[str, Any] = {
        "scenario": scenario,
        "url": options.url,
        "run_id": options.run_id,
        "partial": partial,
        "interrupted": result.interrupted,
        "missing_workers": result.missing_workers,
        "load_s": round(load_s, 3),
        "wall_s": round(result.wall_s, 3),
        "processes": len(result.workers) + result.missing_workers,
        "connections": {
            "planned": options.connection_count(),
            "attempted": stats.get("conn.attempted"),
            "opened": stats.get("conn.opened"),
            "failed": stats.total("conn.failed"),
            "closed_by_server": stats.total("conn.closed_by_server"),
            "errors": {
                k: v
                for k, v in _by_prefix(stats, "conn.").items()
                if k not in {"attempted", "opened", "alive"}
            },
        },
        "traffic": {area: _traffic(stats, area, load_s) for area in areas},
        "latency_ms": {
            name: hist.summary_ms()
            for name, hist in sorted(stats.histograms.items())
            if not name.startswith("generator.")
        },
        "server_errors": _by_prefix(stats, "error."),
        "generator": {
            "workers": [
                {k: w.get(k) for k in ("index", "cpu_share", "cpu_s", "wall_s", "error")}
                for w in result.workers
            ],
            "max_cpu_share": max((float(w.get("cpu_share") or 0) for w in result.workers), default=0.0),
            "loop_lag_ms": lag.summary_ms() if lag else None,
            "machine_busy": None if result.machine_busy is None else round(result.machine_busy, 3),
        },
        "server": result.server,
        "counters": dict(sorted(stats.counters.items())),
    }
    if scenario in {"match", "soak"}:
        names = (
            "completed",
            "double",
            "mismatch",
            "incomplete",
            "stalled",
            "stray",
            "no_peer",
            "repeat_assign",
            "peer_left",
            "request_timeouts",
            "bad_assign",
        )
        match: dict[str, Any] = {name: stats.get(f"match.{name}") for name in names}
        match["match_rate"] = _rate(match["completed"], load_s)
        figures["match"] = match
    if scenario == "search":
        figures["search"] = search_figures(stats, options, load_s)
    if scenario == "conns":
        figures["connections"]["alive"] = stats.get("conn.alive")
        figures["connections"]["unresponsive"] = stats.get("conn.unresponsive")
    violations = {name: stats.get(name) for name in INTEGRITY if stats.get(name)}
    for key, name in SEARCH_INTEGRITY.items():
        if figures.get("search", {}).get(key):
            violations[name] = figures["search"][key]
    figures["violations"] = violations
    figures["integrity_ok"] = not violations
    figures["generator"]["saturated"] = figures["generator"]["max_cpu_share"] >= CPU_SATURATED
    figures["warnings"] = warnings(figures, stats)
    return figures


def search_figures(stats: Stats, options: Options, load_s: float) -> dict[str, Any]:
    """The search scenario's figures: its counters, the wait percentiles and the run-wide
    checks over every worker's searches (``searchcheck.analyse``)."""
    rules = Rules(options.interest_wait, options.cooldown, options.fairness_slack)
    check = analyse(stats.records.get("search", []), rules)
    matches = stats.get("search.matches")
    with_interests = stats.get("search.with_interests")
    fallbacks = stats.get("search.fallbacks")
    wait = stats.histograms.get("search.wait")
    figures: dict[str, Any] = {
        "matches": matches,
        "match_rate": _rate(matches, load_s),
        "talks": stats.get("search.talks"),
        "wait_ms": None
        if wait is None or not wait.count
        else {
            "count": wait.count,
            "p50": wait.percentile(50) / 1000.0,
            "p95": wait.percentile(95) / 1000.0,
            "p99": wait.percentile(99) / 1000.0,
            "max": wait.max / 1000.0,
        },
        "with_interests": with_interests,
        "fallbacks": fallbacks,
        "fallback_rate": round(fallbacks / with_interests, 3) if with_interests else 0.0,
        "timeouts": stats.get("search.timeouts"),
        "double": stats.get("search.double"),
        "mismatch": stats.get("search.mismatch"),
        "pairing_mismatches": check["mismatched"],
        "rematches": check["rematches"],
        "unfair": check["unfair"],
        "passed_over": check["passed_over"],
        "fairness_checked": check["fairness_checked"],
        "unfair_examples": check["unfair_examples"],
    }
    for name in (
        "stalled",
        "peer_left",
        "request_timeouts",
        "after_cancel",
        "stray",
        "repeat_assign",
        "bad_assign",
        "assign_before_searching",
        "unexpected_searching",
        "unexpected_assign",
        "records_dropped",
    ):
        figures[name] = stats.get(f"search.{name}")
    return figures


def warnings(figures: dict[str, Any], stats: Stats) -> list[str]:
    """Plain-language cautions about how far the figures can be trusted."""
    out: list[str] = []
    if figures["interrupted"]:
        out.append(f"partial run: stopped early after {figures['load_s']} s of load")
    if figures["missing_workers"]:
        out.append(f"{figures['missing_workers']} worker(s) never reported: their figures are missing")
    # With nothing connected there was no load: the CPU figures are start-up noise.
    loaded = figures["connections"]["opened"] > 0
    for worker in figures["generator"]["workers"]:
        if worker.get("error"):
            out.append(f"worker {worker['index']} failed: {worker['error']}")
        share = float(worker.get("cpu_share") or 0.0)
        if loaded and share >= CPU_SATURATED:
            out.append(
                f"load generator worker {worker['index']} used {share:.0%} of a core: the tool "
                "itself was a bottleneck (use --processes, or fewer clients)"
            )
    lag = figures["generator"]["loop_lag_ms"]
    if lag and lag["p99"] > LOOP_LAG_WARN_MS:
        out.append(
            f"the tool's event loop lagged {lag['p99']:.0f} ms (p99): latencies include the tool's own delay"
        )
    busy = figures["generator"]["machine_busy"]
    if loaded and busy is not None and busy >= MACHINE_BUSY_WARN:
        out.append(f"the machine's cores were {busy:.0%} busy: server and load generator competed for CPU")
    refused = stats.total("error.rate_limited")
    if refused:
        out.append(
            f"{refused} messages were refused by the server's rate limits: benchmarks need "
            "the server started with --rate-limit 0 --match-rate 0"
        )
    connections = figures["connections"]
    if connections["failed"]:
        out.append(f"{connections['failed']} connection attempts failed")
    if server_closed_all(figures):
        out.append(
            f"the server closed all {connections['opened']} connections before the run ended (did it "
            "stop?): the rates are over a load phase it did not serve, and the run is not a pass"
        )
    elif connections["closed_by_server"]:
        out.append(f"the server closed {connections['closed_by_server']} live connections")
    if stats.get("run.drain_timeouts"):
        out.append("not all in-flight traffic arrived within --drain-timeout")
    timeouts = stats.get("room.window_timeouts") + stats.get("dm.window_timeouts")
    if timeouts:
        out.append(f"senders gave up waiting for confirmations {timeouts} times (--inflight-timeout)")
    skipped = stats.get("room.pacer_skipped") + stats.get("dm.pacer_skipped")
    planned = stats.get("room.sent") + stats.get("dm.sent") + skipped
    if skipped > max(1, planned // 100):  # a slot or two late is noise, not a missed rate
        out.append(f"the target rate was not kept: {skipped} send slots were skipped")
    if stats.get("match.stalled"):
        out.append(f"{stats.get('match.stalled')} matches stalled (--match-timeout)")
    search = figures.get("search")
    if search is not None:
        if search["stalled"]:
            out.append(f"{search['stalled']} matches stalled (--match-timeout)")
        if search["records_dropped"]:
            out.append(
                f"{search['records_dropped']} searches were not kept for the run-wide checks "
                "(pairings, rematches, fairness): those figures cover part of the run"
            )
        if search["bad_assign"] or (search["matches"] and not search["fairness_checked"]):
            out.append(
                "some assign_role or searching replies lacked matchId, commonInterests or createTime: "
                "the run-wide checks could not use them (is this a server with PROTOCOL.md section 12?)"
            )
    if figures["connections"]["opened"] == 0:
        out.append("no connection could be opened: is the server running at --url?")
    return out


def server_closed_all(figures: dict[str, Any]) -> bool:
    """Whether the server closed every connection the tool opened before the tool did:
    it went away (or shut down) mid-run, so nothing was measured after that."""
    connections = figures["connections"]
    return bool(connections["opened"]) and connections["closed_by_server"] >= connections["opened"]


def exit_code(figures: dict[str, Any]) -> int:
    """130 when interrupted; 1 when the server broke a guarantee, nobody connected, or the
    server closed every connection mid-run; else 0."""
    if figures["interrupted"]:
        return 130
    if not figures["integrity_ok"] or figures["connections"]["opened"] == 0 or server_closed_all(figures):
        return 1
    return 0
