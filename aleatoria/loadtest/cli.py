"""Command line: ``aleatoria-loadtest SCENARIO [flags]`` (also ``python -m aleatoria.loadtest``
and ``python scripts/loadtest.py``). ``main(argv) -> int`` is the whole program, so tests
call it directly. Exit status: 0 fine, 1 a protocol guarantee was broken (loss,
duplicates, reordering, double matches…), nothing could connect or the server closed every
connection mid-run, 2 bad usage,
130 stopped by Ctrl-C (after printing the partial report).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import attrs
from rich.console import Console

from aleatoria.loadtest.coordinator import run_load
from aleatoria.loadtest.options import Options, OptionsError, validate
from aleatoria.loadtest.plot import plot_path_problem, write_plot
from aleatoria.loadtest.procstat import sample_process
from aleatoria.loadtest.progress import LineDisplay, LiveDisplay
from aleatoria.loadtest.report import render, write_json
from aleatoria.loadtest.results import Display
from aleatoria.loadtest.scenarios.soak import SOAK_DEFAULTS
from aleatoria.loadtest.summary import exit_code, summarize

DESCRIPTION = """\
Load-test a server that speaks the Aleatoria protocol (docs/loadtest.md has the details).
Targets loopback only unless --allow-remote. Benchmarks need the server's rate limits off:
`aleatoria serve --rate-limit 0 --match-rate 0`."""


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--url", help="server base URL, ws:// or wss://")
    group.add_argument("--duration", type=float, help="seconds of load after all clients are ready")
    group.add_argument("--processes", type=int, help="worker processes to spread clients over")
    group.add_argument("--connect-timeout", type=float, help="seconds per handshake")
    group.add_argument("--connect-concurrency", type=int, help="handshakes in flight at once")
    group.add_argument(
        "--drain-timeout", type=float, help="seconds to wait for in-flight traffic after the load phase"
    )
    group.add_argument("--max-connections", type=int, help="refuse runs that would open more connections")
    group.add_argument(
        "--allow-remote",
        action="store_true",
        default=None,
        help="allow a non-loopback --url (never needed for local benchmarks)",
    )
    group.add_argument(
        "--insecure", action="store_true", default=None, help="wss://: do not verify the server certificate"
    )
    group.add_argument(
        "--server-pid", type=int, help="also report this process's (and its children's) CPU and memory"
    )
    group.add_argument(
        "--level",
        type=int,
        choices=(1, 2),
        help="protocol level of every connection: 2 connects with v=2 (welcome, presence events)",
    )
    group.add_argument("--run-id", help="tag in every user id and room name (random)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    out.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="write latency over time and a latency histogram"
    )
    out.add_argument("--quiet", action="store_true", help="no progress display")
    out.add_argument(
        "--progress-interval",
        type=float,
        default=1.0,
        help="seconds between progress lines when not on a terminal, 0 = none (default: 1)",
    )


def _fanout(parser: argparse.ArgumentParser, soak: bool = False) -> None:
    group = parser.add_argument_group("rooms")
    group.add_argument("--rooms", type=int, help="rooms (R)")
    group.add_argument("--members", type=int, help="members per room (M)")
    group.add_argument("--senders", type=int, help="senders per room (S), among the members")
    group.add_argument("--window", type=int, help="unconfirmed messages per sender")
    group.add_argument(
        "--rate", type=float, help="room messages per second in total, 0 = as fast as the window allows"
    )
    _sizes(group)


def _sizes(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--size", type=int, help="characters per message content")
    group.add_argument(
        "--inflight-timeout",
        type=float,
        help="seconds a sender waits for a confirmation before resetting its window",
    )


def _dm(parser: argparse.ArgumentParser, soak: bool = False) -> None:
    group = parser.add_argument_group("direct messages")
    group.add_argument("--pairs", type=int, help="ping-pong pairs (P)")
    prefix = "--dm-" if soak else "--"
    group.add_argument(
        f"{prefix}window", dest="dm_window", type=int, help="unanswered pings per pair, 1 = strict ping-pong"
    )
    group.add_argument(
        f"{prefix}rate",
        dest="dm_rate",
        type=float,
        help="pings per second in total, 0 = as fast as the window allows",
    )
    if not soak:
        _sizes(group)


def _match(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("matching")
    group.add_argument("--users", type=int, help="users cycling through matches (N)")
    group.add_argument("--match-pause", type=float, help="seconds between a user's matches")
    group.add_argument(
        "--match-timeout", type=float, help="seconds without progress before a match counts as stalled"
    )


def _search(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("search queue")
    group.add_argument("--users", type=int, help="users searching, talking and pressing Next (N)")
    group.add_argument("--match-pause", type=float, help="seconds a pair talks before Next")
    group.add_argument(
        "--match-timeout", type=float, help="seconds without progress before a match counts as stalled"
    )
    group.add_argument("--vocabulary", type=int, help="distinct interests, t0 the most popular")
    group.add_argument("--interests-per-user", type=int, help="interests each user gives, 0-10")
    group.add_argument("--zipf", type=float, help="popularity exponent: tag i weighs 1/(i+1)^zipf")
    group.add_argument("--languages", help="comma list of ISO 639-1 codes and 'any' to give users")
    group.add_argument(
        "--interest-wait", type=float, help="the server's ALEATORIA_INTEREST_WAIT, for the checks"
    )
    group.add_argument(
        "--cooldown", type=float, help="the server's ALEATORIA_REMATCH_COOLDOWN, for the checks"
    )
    group.add_argument("--fairness-slack", type=float, help="seconds of timing doubt the checks allow")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aleatoria-loadtest",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    helps = {
        "fanout": "R rooms × M members, S senders per room with an in-flight window",
        "dm": "P pairs playing direct-message ping-pong",
        "match": "N users: available → request → offer/answer/candidates → hangup → again",
        "conns": "open N idle connections, hold them for --duration, close",
        "soak": "rooms, DMs and matching together at a steady rate (default 60 s)",
        "search": "N users with interests: search (wait) → talk → Next, checked for fairness",
    }
    for name, text in helps.items():
        scenario = sub.add_parser(name, help=text, description=text)
        if name in {"fanout", "soak"}:
            _fanout(scenario)
        if name in {"dm", "soak"}:
            _dm(scenario, soak=name == "soak")
        if name in {"match", "soak"}:
            _match(scenario)
        if name == "search":
            _search(scenario)
        if name == "conns":
            scenario.add_argument("--connections", type=int, help="idle connections (N)")
        _common(scenario)
        _show_defaults(scenario, scenario_defaults(name))
    return parser


def scenario_defaults(scenario: str) -> dict[str, Any]:
    """The option values a run of ``scenario`` uses for flags not given."""
    values: dict[str, Any] = {
        field.name: field.default
        for field in Options.__attrs_attrs__
        if not isinstance(field.default, attrs.Factory)  # type: ignore[arg-type]
    }
    if scenario == "soak":
        values.update(SOAK_DEFAULTS)
    return values


def shown_default(value: Any) -> str | None:
    """A default as --help shows it; None for those not worth showing (switches, unset)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else "none"


def _show_defaults(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """Append each flag's real default for this scenario to its help (the flags' own
    argparse default stays None, so that ``options_from_args`` can tell "not given")."""
    for action in parser._actions:
        if action.dest not in defaults or not action.help:
            continue
        shown = shown_default(defaults[action.dest])
        if shown is not None:
            action.help += f" (default: {shown})"


def options_from_args(args: argparse.Namespace) -> Options:
    """Options from the parsed flags; unset flags keep the scenario's defaults."""
    values: dict[str, Any] = {}
    if args.scenario == "soak":
        values.update(SOAK_DEFAULTS)
    fields = {field.name for field in Options.__attrs_attrs__}
    for name, value in vars(args).items():
        if name in fields and value is not None:
            values[name] = value
    return Options(**values)


def _display(
    args: argparse.Namespace, console: Console
) -> tuple[AbstractContextManager[Any], Display | None]:
    if args.quiet:
        return nullcontext(), None
    if console.is_terminal:
        live = LiveDisplay(console)
        return live, live
    if args.progress_interval <= 0:
        return nullcontext(), None
    lines = LineDisplay(sys.stderr, args.progress_interval)
    return lines, lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = validate(options_from_args(args))
    except (OptionsError, TypeError) as exc:
        print(f"aleatoria-loadtest: error: {exc}", file=sys.stderr)
        return 2
    problem = None if args.plot is None else plot_path_problem(args.plot)
    if options.server_pid is not None and sample_process(options.server_pid) is None:
        # Checked now: the report would only say "not readable" after the whole run.
        problem = f"--server-pid {options.server_pid}: no such process in /proc (give the server's pid)"
    if problem is not None:
        print(f"aleatoria-loadtest: error: {problem}", file=sys.stderr)
        return 2
    errors = Console(stderr=True)
    context, display = _display(args, errors)
    try:
        with context:
            result = run_load(options, display)
    except KeyboardInterrupt:  # only outside the run itself, which counts Ctrl-Cs instead
        print("aleatoria-loadtest: interrupted before any figure was collected", file=sys.stderr)
        return 130
    figures = summarize(result)
    if args.plot is not None:
        try:
            write_plot(result.stats, args.plot, f"aleatoria load test: {options.scenario}")
            figures["plot"] = str(args.plot)
        except ImportError as exc:  # matplotlib, an extra needed only for --plot
            figures["warnings"].append(
                f"could not write the plot ({exc.name} is not installed): pip install 'aleatoria[loadtest]'"
            )
        except (OSError, ValueError) as exc:
            figures["warnings"].append(f"could not write the plot: {exc}")
    if args.json:
        write_json(figures, sys.stdout)
    else:
        render(figures, Console())
    if "plot" in figures:  # on stderr: with --json, stdout holds the JSON object alone
        print(f"aleatoria-loadtest: plot written to {args.plot.resolve()}", file=sys.stderr)
    return exit_code(figures)
