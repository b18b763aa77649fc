"""The end-of-run report: a rich summary table for people, one JSON object for machines."""

from __future__ import annotations

import json
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from aleatoria.loadtest.summary import server_closed_all


def write_json(figures: dict[str, Any], stream: TextIO) -> None:
    stream.write(json.dumps(figures, indent=2, sort_keys=False) + "\n")
    stream.flush()


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(title: str) -> Table:
    table = Table(title=title, title_justify="left", show_header=True, expand=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    return table


def render(figures: dict[str, Any], console: Console) -> None:
    """Print the summary tables and warnings of ``figures`` (from ``summarize``)."""
    connected = figures["connections"]["opened"] > 0
    if figures["partial"]:
        state = "partial"
    elif not connected:
        state = "nothing connected"
    else:
        state = "server closed every connection" if server_closed_all(figures) else "complete"
    console.print(
        f"[bold]aleatoria load test[/bold] — {figures['scenario']} against {figures['url']} "
        f"(run {figures['run_id']}, {state}, {figures['load_s']} s of load, "
        f"{figures['processes']} process(es))",
        soft_wrap=True,  # one line, also in logs: never wrapped at the console width
    )

    conns = figures["connections"]
    table = _table("Connections")
    for key in ("planned", "opened", "failed", "closed_by_server", "alive", "unresponsive"):
        if key in conns:
            table.add_row(key.replace("_", " "), _num(conns[key]))
    for key, value in conns["errors"].items():
        table.add_row(f"  {key}", _num(value))
    console.print(table)

    for area, traffic in figures["traffic"].items():
        table = _table("Room messages" if area == "room" else "Direct messages")
        for key, value in traffic.items():
            if value or key in {"sent", "delivered", "lost", "duplicated", "reordered"}:
                label = key.replace("_", " ") + (" /s" if key.endswith("rate") else "")
                table.add_row(label, _num(value))
        console.print(table)

    if "match" in figures:
        table = _table("Matching")
        for key, value in figures["match"].items():
            if value or key in {"completed", "double", "mismatch", "match_rate"}:
                table.add_row(key.replace("_", " ") + (" /s" if key == "match_rate" else ""), _num(value))
        console.print(table)

    if "search" in figures:
        _search_table(figures["search"], console)

    if figures["latency_ms"]:
        table = Table(title="Latency (ms)", title_justify="left")
        for column in ("metric", "count", "p50", "p90", "p99", "max"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for name, lat in figures["latency_ms"].items():
            table.add_row(name, _num(lat["count"]), *(f"{lat[k]:.2f}" for k in ("p50", "p90", "p99", "max")))
        console.print(table)

    table = _table("Load generator and server")
    gen = figures["generator"]
    if connected:  # else there was no load: the generator's figures are its start-up
        table.add_row("generator CPU (max, share of a core)", f"{gen['max_cpu_share']:.0%}")
        if gen["loop_lag_ms"]:
            table.add_row("generator loop lag p99 (ms)", f"{gen['loop_lag_ms']['p99']:.1f}")
        if gen["machine_busy"] is not None:
            table.add_row("machine CPU busy", f"{gen['machine_busy']:.0%}")
    server = figures.get("server") or {}
    if server.get("available"):
        table.add_row("server CPU (cores)", f"{server['cpu_cores']:.2f}")
        table.add_row(
            "server RSS start / peak / end (MiB)",
            f"{server['rss_start_mib']} / {server['rss_peak_mib']} / {server['rss_end_mib']}",
        )
        if server.get("rss_per_connection_kib") is not None:
            table.add_row("server RSS per connection (KiB)", f"{server['rss_per_connection_kib']}")
    elif server:
        table.add_row("server", f"pid {server['pid']} not readable")
    if table.row_count:
        console.print(table)

    if figures["server_errors"]:
        table = _table("Server error replies")
        for code, count in figures["server_errors"].items():
            table.add_row(code, _num(count))
        console.print(table)

    if connected:  # no verdict without traffic; the warnings below say why
        if figures["integrity_ok"]:
            console.print(
                "[green]integrity: no loss, duplicate, reordering, double match"
                + (", rematch or unfair match" if "search" in figures else "")
                + " seen[/green]",
                soft_wrap=True,
            )
        else:
            broken = ", ".join(f"{k} {v}" for k, v in figures["violations"].items())
            console.print(f"[bold red]integrity violations: {broken}[/bold red]", soft_wrap=True)
    for warning in figures["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)


def _search_table(search: dict[str, Any], console: Console) -> None:
    table = _table("Search queue")
    table.add_row("matches", _num(search["matches"]))
    table.add_row("matches /s", _num(search["match_rate"]))
    wait = search["wait_ms"]
    if wait:
        for key in ("p50", "p95", "p99", "max"):
            table.add_row(f"wait {key} (ms)", f"{wait[key]:,.1f}")
    table.add_row("fallback rate", f"{search['fallback_rate']:.1%} of {search['with_interests']:,}")
    always = {"timeouts", "double", "rematches", "unfair"}
    for key in (
        "timeouts",
        "double",
        "mismatch",
        "pairing_mismatches",
        "rematches",
        "unfair",
        "passed_over",
        "fairness_checked",
        "stalled",
        "peer_left",
        "request_timeouts",
        "after_cancel",
        "stray",
        "records_dropped",
    ):
        if search[key] or key in always:
            table.add_row(key.replace("_", " "), _num(search[key]))
    console.print(table)
    for example in search["unfair_examples"]:
        console.print(
            f"[red]unfair:[/red] match {example['matchId']} ({example['served']} took "
            f"{example['partner']}) passed over {', '.join(example['passed_over'])}",
            soft_wrap=True,
        )
