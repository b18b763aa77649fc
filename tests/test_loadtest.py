"""Tests of the load-test tool (issue 4): its measuring core, every scenario against a
fake server that is correct or broken on purpose, the CLI, and (when the real server
is there) every scenario against ``aleatoria.server.serve``."""

from __future__ import annotations

import argparse
import errno
import functools
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from loadtest_fakeserver import FakeServer, Faults
from rich.console import Console
from trio_websocket import HandshakeError

from aleatoria.loadtest import cli
from aleatoria.loadtest.client import failure_reason
from aleatoria.loadtest.histogram import Histogram, Timeline
from aleatoria.loadtest.inline import run_inline
from aleatoria.loadtest.options import SCENARIOS, Options, OptionsError, validate
from aleatoria.loadtest.payload import decode, encode
from aleatoria.loadtest.progress import PRIMARY, LineDisplay, describe
from aleatoria.loadtest.report import render
from aleatoria.loadtest.results import ProgressView
from aleatoria.loadtest.stats import Stats
from aleatoria.loadtest.summary import exit_code, summarize
from aleatoria.loadtest.tracking import MAX_HOLES, Arrival, SequenceTracker

pytestmark = pytest.mark.loopback  # the load-test tool (not a server test) against real servers

REPO = Path(__file__).resolve().parent.parent
RUN_LIMIT = 60  # seconds: a hung run fails the test instead of hanging the suite


# -- pure core ------------------------------------------------------------------------


def test_histogram_percentiles_are_within_bucket_precision() -> None:
    """Percentiles of 1..100000 µs are within 1.6 % and min/max/count are exact."""
    hist = Histogram()
    for value in range(1, 100_001):
        hist.record(value)
    assert 100_000 == hist.count
    assert 100_000 == hist.max
    assert 1 == hist.min
    for pct in (50, 90, 99):
        expected = pct * 1000
        assert abs(hist.percentile(pct) - expected) <= expected * 0.016


def test_histogram_stays_small_and_round_trips() -> None:
    """A hundred thousand distinct values use at most a few thousand buckets; dicts round-trip."""
    hist = Histogram()
    for value in range(0, 10**9, 9973):
        hist.record(value)
    assert len(list(hist.buckets())) < 2000
    copy = Histogram.from_dict(json.loads(json.dumps(hist.to_dict())))
    assert hist.percentile(99) == copy.percentile(99)
    assert hist.count == copy.count


def test_histogram_merge_equals_recording_everything() -> None:
    """Merging two histograms gives the figures of one that saw every sample."""
    a, b, both = Histogram(), Histogram(), Histogram()
    for value in range(0, 5000, 3):
        (a if value % 2 else b).record(value)
        both.record(value)
    a.merge(b)
    assert both.summary_ms() == a.summary_ms()


def test_timeline_is_bounded_and_keeps_every_sample() -> None:
    """A long run coarsens the slices instead of growing; no sample is lost."""
    timeline = Timeline(width_ns=1_000_000, max_slices=16)
    for second in range(1000):
        timeline.record(second * 10_000_000, 5)
    assert len(timeline.slices) <= 16
    assert 1000 == sum(h.count for _, h in timeline.points())


def test_stats_merge_aligns_timelines_of_different_widths() -> None:
    """Workers whose timelines coarsened differently still merge into one series."""
    long_run, short_run = Stats(0), Stats(0)
    for i in range(2000):
        long_run.observe("m", 1_000_000, i * 100_000_000)
    short_run.observe("m", 2_000_000, 50_000_000)
    long_run.merge(Stats.from_dict(short_run.to_dict()))
    assert 2001 == long_run.histograms["m"].count
    assert 2001 == sum(h.count for _, h in long_run.timelines["m"].points())


def test_tracker_classifies_arrivals() -> None:
    """In order, gaps, late fills (order violations) and repeats are told apart."""
    tracker = SequenceTracker()
    arrivals = [tracker.observe(seq) for seq in (0, 1, 3, 2, 3, 5)]
    assert [
        Arrival.IN_ORDER,
        Arrival.IN_ORDER,
        Arrival.IN_ORDER,
        Arrival.LATE,
        Arrival.DUPLICATE,
        Arrival.IN_ORDER,
    ] == arrivals
    assert 1 == tracker.missing(6)  # 4 never came
    assert (1, 1) == (tracker.late, tracker.duplicates)


def test_tracker_memory_is_bounded_under_heavy_loss() -> None:
    """A huge gap records at most MAX_HOLES holes but still counts all as missing."""
    tracker = SequenceTracker()
    tracker.observe(0)
    tracker.observe(10 * MAX_HOLES)
    assert len(tracker.holes) <= MAX_HOLES
    assert 10 * MAX_HOLES - 1 == tracker.missing(10 * MAX_HOLES + 1)


def test_payload_round_trip_padding_and_foreign_content() -> None:
    """Stamps survive the content string, padding hits the size, others are ignored."""
    content = encode(42, 123456789, size=500)
    assert 500 == len(content)
    assert (42, 123456789) == decode(content)
    assert decode("hello") is None
    assert decode(None) is None
    assert decode("lt|x|y|") is None


@pytest.mark.parametrize(
    "url", ["ws://127.0.0.1:1", "ws://localhost:8085", "ws://[::1]:9", "wss://127.9.9.9"]
)
def test_loopback_urls_are_accepted(url: str) -> None:
    """Every loopback form is a valid target without --allow-remote."""
    validate(Options(scenario="fanout", url=url))


@pytest.mark.parametrize(
    "url", ["ws://10.0.0.1:8085", "ws://example.com", "ws://192.168.1.2", "wss://8.8.8.8"]
)
def test_remote_urls_are_refused_unless_allowed(url: str) -> None:
    """A non-loopback target needs --allow-remote; no name is ever resolved."""
    with pytest.raises(OptionsError, match="loopback"):
        validate(Options(scenario="fanout", url=url))
    validate(Options(scenario="fanout", url=url, allow_remote=True))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"duration": 0}, "duration"),
        ({"duration": 10**6}, "duration"),
        ({"rooms": 100, "members": 1000}, "max-connections"),
        ({"senders": 11}, "senders"),
        ({"url": "http://127.0.0.1"}, "ws://"),
        ({"url": "ws://127.0.0.1/ws?userId=x"}, "base URL"),
        ({"url": "ws://127.0.0.1:99999"}, "port"),
        ({"url": "ws://127.0.0.1:http"}, "port"),
        ({"size": 5000}, "size"),
        ({"run_id": "has space"}, "run-id"),
    ],
)
def test_unbounded_or_malformed_runs_are_refused(changes: dict[str, Any], message: str) -> None:
    """Runs are always bounded in time and connections, and the URL is a base URL."""
    with pytest.raises(OptionsError, match=message):
        validate(Options(scenario="fanout", **changes))


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["dm", "--rate", "-5"], "--rate"),
        (["dm", "--window", "0"], "--window"),
        (["soak", "--dm-rate", "-5"], "--dm-rate"),
        (["soak", "--dm-window", "0"], "--dm-window"),
    ],
)
def test_cli_names_the_flag_the_user_gave(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dm scenario's pairs take --window and --rate (soak's take --dm-window and
    --dm-rate): a bad value is refused naming the flag that was typed."""
    assert 2 == cli.main([*argv, "--quiet"])
    assert capsys.readouterr().err.startswith(f"aleatoria-loadtest: error: {flag} must")


def test_cli_refuses_a_server_pid_that_is_not_running(capsys: pytest.CaptureFixture[str]) -> None:
    """--server-pid naming no process (one that has exited, or 0) is a usage error before the
    run, not a "not readable" row in the report after it (or, for 0, silently nothing)."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    with socket.socket() as sock:  # a port nobody listens on: the run must not start at all
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for pid in (gone.stdout.strip(), "0"):
        assert 2 == cli.main(["dm", "--url", f"ws://127.0.0.1:{port}", "--server-pid", pid, "--quiet"])
        assert capsys.readouterr().err.startswith(f"aleatoria-loadtest: error: --server-pid {pid}:")


def test_cli_refuses_remote_target_with_usage_status(capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI exits 2 with a message, before opening anything, for a remote URL."""
    assert 2 == cli.main(["fanout", "--url", "ws://203.0.113.7:8085", "--quiet"])
    assert "loopback" in capsys.readouterr().err


def test_soak_has_its_own_defaults() -> None:
    """soak is paced and long by default; flags still win."""
    args = cli.build_parser().parse_args(["soak", "--rooms", "3"])
    options = cli.options_from_args(args)
    assert (60.0, 50.0, 3) == (options.duration, options.rate, options.rooms)


def _flags(scenario: str) -> dict[str, argparse.Action]:
    """The scenario's flags (option string → action)."""
    parser = cli.build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {flag: action for action in sub.choices[scenario]._actions for flag in action.option_strings}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_help_shows_the_defaults_a_run_uses(scenario: str) -> None:
    """Each flag's --help shows the value a run of this scenario takes when the flag is
    not given (soak's own defaults included), and nothing else in parentheses does."""
    options = cli.options_from_args(cli.build_parser().parse_args([scenario]))
    shown = 0
    for flag, action in _flags(scenario).items():
        value = getattr(options, action.dest, None)
        default = cli.shown_default(value) if action.dest != "run_id" else None
        if default is not None:
            assert (action.help or "").endswith(f"(default: {default})"), (flag, action.help)
            shown += 1
    assert shown >= 9
    if scenario == "soak":
        help_of = {flag: action.help or "" for flag, action in _flags("soak").items()}
        assert help_of["--match-pause"].endswith("(default: 0.5)")
        assert help_of["--rate"].endswith("(default: 50)")


def _doc_rows() -> list[tuple[list[str], str, str]]:
    """docs/loadtest.md's flag tables: (scenarios, flag, default column) per row; the
    common table's rows hold for every scenario."""
    text = (REPO / "docs" / "loadtest.md").read_text()
    section = text.split("## Flags", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`--"):
            rows.append((list(SCENARIOS), cells[0].split()[0].strip("`"), cells[1].strip("`")))
        elif len(cells) == 4 and cells[1].startswith("`--"):
            rows.append(([name.strip() for name in cells[0].split(",")], cells[1].strip("`"), cells[2]))
    return rows


def test_the_docs_give_the_defaults_a_run_uses() -> None:
    """Every number or URL in the default column of docs/loadtest.md's flag tables is the
    one a run uses, "(soak X)" being soak's; every flag of every scenario is in the docs."""
    rows = _doc_rows()
    assert len(rows) > 30
    checked = 0
    for scenarios, flag, column in rows:
        match = re.fullmatch(r"(\S+)(?: \(soak (\S+)\))?", column)
        if match is None or match[1] in {"off", "—", "random", "none"}:
            continue
        for scenario in scenarios:
            action = _flags(scenario)[flag]
            args = cli.build_parser().parse_args([scenario])
            options = cli.options_from_args(args)
            documented = match[2] if scenario == "soak" and match[2] else match[1]
            value = getattr(options, action.dest, getattr(args, action.dest))  # or a display flag
            same = float(documented) == value if isinstance(value, int | float) else documented == value
            assert same, (scenario, flag, documented, value)
            checked += 1
    assert checked > 40
    text = (REPO / "docs" / "loadtest.md").read_text()
    for scenario in SCENARIOS:
        for flag in _flags(scenario):
            assert flag in {"-h", "--help"} or f"`{flag}`" in text, (scenario, flag)


def _scenario_names() -> set[str]:
    """The scenarios the CLI's parser accepts."""
    parser = cli.build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_every_scenario_has_a_primary_latency() -> None:
    """The progress display names a latency for every scenario the CLI accepts."""
    assert set(SCENARIOS) == _scenario_names()
    assert set(SCENARIOS) <= set(PRIMARY)


def _view(scenario: str, recent: dict[str, Histogram]) -> ProgressView:
    return ProgressView(
        options=Options(scenario=scenario),
        elapsed_s=2.0,
        load_elapsed_s=1.0,
        phase="load",
        open_connections=4,
        counters={"search.matches": 3},
        recent=recent,
        interrupted=False,
    )


def test_progress_of_the_search_scenario() -> None:
    """search shows its wait latency and counts its matches; a line is written for it."""
    wait = Histogram()
    wait.record(2000)
    figures = describe(_view("search", {"search.wait": wait}), (0.0, 0.0, 1.5))
    assert "2.00/2.00" == figures["search.wait p50/p99 ms"]
    assert "1.5" == figures["matches/s"]
    stream = io.StringIO()
    LineDisplay(stream, 1.0).update(_view("search", {}))
    assert "search.wait p50/p99 ms=-" in stream.getvalue()


# -- scenarios against the fake server ----------------------------------------------


async def start_fake(nursery: trio.Nursery, faults: Faults | None = None) -> FakeServer:
    fake = FakeServer(faults or Faults())
    await nursery.start(fake.serve)
    return fake


async def run(fake: FakeServer, scenario: str, **changes: Any) -> dict[str, Any]:
    options = validate(
        Options(
            scenario=scenario,
            url=f"ws://127.0.0.1:{fake.port}",
            **{"duration": 1.0, "drain_timeout": 2.0, **changes},
        )
    )
    with trio.fail_after(RUN_LIMIT):
        return summarize(await run_inline(options))


async def test_fanout_correct_server_zero_loss(nursery: trio.Nursery) -> None:
    """Against a correct server every message reaches every member once, in order."""
    fake = await start_fake(nursery)
    figures = await run(fake, "fanout", rooms=2, members=3, senders=2, window=4)
    room = figures["traffic"]["room"]
    assert room["sent"] > 0
    assert room["sent"] * 3 == room["expected"] == room["delivered"]
    assert (0, 0, 0) == (room["lost"], room["duplicated"], room["reordered"])
    assert room["delivered"] == figures["latency_ms"]["room.delivery"]["count"]
    assert 6 == figures["connections"]["opened"]
    assert figures["integrity_ok"]
    assert 0 == exit_code(figures)


async def test_fanout_detects_dropped_messages(nursery: trio.Nursery) -> None:
    """A server dropping every 5th delivery shows about a fifth of deliveries lost."""
    fake = await start_fake(nursery, Faults(drop_every=5))
    figures = await run(fake, "fanout", rooms=1, members=3, senders=1, drain_timeout=0.5)
    room = figures["traffic"]["room"]
    assert room["expected"] == room["delivered"] + room["lost"]
    assert room["expected"] // 5 - 3 <= room["lost"] <= room["expected"] // 5 + 3
    assert not figures["integrity_ok"]
    assert 1 == exit_code(figures)


async def test_fanout_detects_reordering(nursery: trio.Nursery) -> None:
    """A server swapping deliveries in pairs produces order violations, not loss."""
    fake = await start_fake(nursery, Faults(swap=True))
    figures = await run(fake, "fanout", rooms=1, members=2, senders=1)
    room = figures["traffic"]["room"]
    assert room["reordered"] > 0
    assert 0 == room["lost"]
    assert {"room.reordered": room["reordered"]} == figures["violations"]


async def test_fanout_detects_duplicates(nursery: trio.Nursery) -> None:
    """A server repeating every 4th delivery is caught; duplicates are not deliveries."""
    fake = await start_fake(nursery, Faults(duplicate_every=4))
    figures = await run(fake, "fanout", rooms=1, members=2, senders=1)
    room = figures["traffic"]["room"]
    assert room["duplicated"] > 0
    assert room["expected"] == room["delivered"]


async def test_rate_limit_refusals_are_a_figure_not_loss(nursery: trio.Nursery) -> None:
    """Messages the server refused with rate_limited are counted and warned about, and
    are not reported as lost."""
    fake = await start_fake(nursery, Faults(rate_limit_every=4))
    figures = await run(fake, "fanout", rooms=1, members=2, senders=1)
    room = figures["traffic"]["room"]
    assert room["refused"] > 0
    assert room["refused"] == figures["server_errors"]["rate_limited"]
    assert 0 == room["lost"]
    assert any("--rate-limit 0" in w for w in figures["warnings"])


async def test_fanout_rate_paces_senders(nursery: trio.Nursery) -> None:
    """--rate caps the total send rate (here 40/s for 1 s, so about 40 messages)."""
    fake = await start_fake(nursery)
    figures = await run(fake, "fanout", rooms=2, members=2, senders=1, rate=40)
    assert 20 <= figures["traffic"]["room"]["sent"] <= 44


async def test_dm_correct_server(nursery: trio.Nursery) -> None:
    """Every ping is answered; all four delivery streams are complete and in order."""
    fake = await start_fake(nursery)
    figures = await run(fake, "dm", pairs=3)
    dm = figures["traffic"]["dm"]
    assert dm["sent"] > 0
    assert dm["sent"] == dm["replies"]
    assert 4 * dm["sent"] == dm["expected"] == dm["delivered"]
    assert dm["sent"] == figures["latency_ms"]["dm.rtt"]["count"]
    assert figures["integrity_ok"]


async def test_dm_detects_dropped_messages(nursery: trio.Nursery) -> None:
    """Dropped direct messages are reported lost; the window recovers from them."""
    fake = await start_fake(nursery, Faults(drop_every=5))
    figures = await run(fake, "dm", pairs=2, inflight_timeout=0.2, drain_timeout=0.5)
    dm = figures["traffic"]["dm"]
    assert dm["lost"] > 0
    assert dm["expected"] == dm["delivered"] + dm["lost"]
    assert not figures["integrity_ok"]


async def test_match_correct_server(nursery: trio.Nursery) -> None:
    """Users complete match cycles with no double match, disagreement or stall."""
    fake = await start_fake(nursery)
    figures = await run(fake, "match", users=6)
    match = figures["match"]
    assert match["completed"] > 0
    problems = {k: match[k] for k in ("double", "mismatch", "incomplete", "stalled", "stray")}
    assert {"double": 0, "mismatch": 0, "incomplete": 0, "stalled": 0, "stray": 0} == problems
    assert figures["integrity_ok"]
    assert fake.matches == {}  # the drain finished every call before closing
    assert match["completed"] == figures["latency_ms"]["match.setup"]["count"]


async def test_match_detects_double_matches(nursery: trio.Nursery) -> None:
    """A server that hands out users already in a call is caught as double matches."""
    fake = await start_fake(nursery, Faults(double_match=True))
    figures = await run(fake, "match", users=6, match_timeout=0.3)
    assert figures["match"]["double"] > 0
    assert not figures["integrity_ok"]


async def test_conns_opens_holds_and_checks(nursery: trio.Nursery) -> None:
    """Every idle connection opens, answers a ping after the hold, and the server's
    memory is reported when its pid is given."""
    fake = await start_fake(nursery)
    figures = await run(fake, "conns", connections=30, duration=0.5, server_pid=os.getpid())
    conns = figures["connections"]
    assert (30, 30, 0) == (conns["opened"], conns["alive"], conns["failed"])
    assert figures["server"]["available"]
    assert figures["server"]["rss_peak_mib"] > 0
    assert 30 == figures["latency_ms"]["connect"]["count"]


async def test_soak_runs_every_part(nursery: trio.Nursery) -> None:
    """soak drives rooms, DMs and matching at once, each clean against a correct server."""
    fake = await start_fake(nursery)
    figures = await run(
        fake,
        "soak",
        duration=1.5,
        rooms=1,
        members=3,
        senders=1,
        rate=40,
        pairs=2,
        dm_rate=20,
        users=4,
        match_pause=0.05,
    )
    assert figures["traffic"]["room"]["sent"] > 0
    assert figures["traffic"]["dm"]["sent"] > 0
    assert figures["match"]["completed"] > 0
    assert figures["integrity_ok"], figures["violations"]


async def test_stop_gives_a_drained_partial_report(nursery: trio.Nursery) -> None:
    """Stopping early (what Ctrl-C does) ends the load phase but still drains, so the
    partial figures have no false loss."""
    fake = await start_fake(nursery)
    stop = trio.Event()
    options = validate(
        Options(
            scenario="fanout", url=f"ws://127.0.0.1:{fake.port}", duration=3600, rooms=1, members=3, senders=1
        )
    )

    async def stop_after_some_traffic() -> None:
        await fake.wait_chats(50)
        stop.set()

    nursery.start_soon(stop_after_some_traffic)
    with trio.fail_after(RUN_LIMIT):
        figures = summarize(await run_inline(options, stop=stop))
    assert figures["partial"]
    assert figures["load_s"] < 60
    assert 0 == figures["traffic"]["room"]["lost"]
    assert 130 == exit_code(figures)


async def test_unreachable_server_is_reported_not_raised() -> None:
    """No server: every connection fails, the run still reports, and exits 1."""
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = validate(Options(scenario="dm", url=f"ws://127.0.0.1:{port}", pairs=2))
    with trio.fail_after(RUN_LIMIT):
        figures = summarize(await run_inline(options))
    assert 4 == figures["connections"]["failed"]
    assert {"failed.refused": 4} == figures["connections"]["errors"]
    assert 1 == exit_code(figures)
    assert not any("of a core" in warning or "busy" in warning for warning in figures["warnings"])


async def test_a_server_that_stops_mid_run_fails_the_run(nursery: trio.Nursery) -> None:
    """The server going away during the load phase (every connection dropped under the tool)
    is not a clean run: the report says the server closed them all and the exit status is 1."""
    fake = FakeServer()
    server_scope = trio.CancelScope()

    async def serve_until_stopped(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with server_scope:
            await fake.serve(task_status=task_status)

    await nursery.start(serve_until_stopped)

    async def stop_the_server_after_some_traffic() -> None:
        await fake.wait_chats(20)
        server_scope.cancel()

    nursery.start_soon(stop_the_server_after_some_traffic)
    options = validate(
        Options(
            scenario="dm",
            url=f"ws://127.0.0.1:{fake.port}",
            pairs=2,
            dm_rate=40,
            duration=2.0,
            drain_timeout=0.5,
        )
    )
    with trio.fail_after(RUN_LIMIT):
        figures = summarize(await run_inline(options))
    assert 4 == figures["connections"]["closed_by_server"]
    assert any("closed all 4 connections" in warning for warning in figures["warnings"])
    assert 1 == exit_code(figures)
    table = io.StringIO()
    render(figures, Console(file=table, width=200))
    assert "server closed every connection" in table.getvalue().splitlines()[0]


# trio-websocket 0.12's reader does not close its socket when cancelled mid-handshake: the
# socket is closed when the connection object is dropped (at once, by reference count), which
# warns. See run_client.
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
async def test_a_server_that_never_answers_the_handshake_times_out_at_connect_timeout(
    nursery: trio.Nursery,
) -> None:
    """A server that accepts TCP connections but never answers the WebSocket handshake costs
    --connect-timeout, not the run's hard deadline: each attempt is counted as a timeout and
    the run reports that nothing connected."""

    async def accept_and_stay_silent(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, host="127.0.0.1"), accept_and_stay_silent, 0
    )
    port = listeners[0].socket.getsockname()[1]
    options = validate(
        Options(scenario="dm", url=f"ws://127.0.0.1:{port}", pairs=1, connect_timeout=0.5, duration=1.0)
    )
    with trio.fail_after(10):  # the hard deadline is 33 s: far beyond
        figures = summarize(await run_inline(options))
    assert {"failed.timeout": 2} == figures["connections"]["errors"]
    assert 1 == exit_code(figures)


def test_a_failed_connect_is_refused_only_when_every_attempt_was() -> None:
    """trio's "all attempts failed" OSError is looked through: refused when every address
    tried refused, network when one failed otherwise (or the cause is unknown)."""

    def wrapped(*attempts: OSError) -> HandshakeError:
        group = ExceptionGroup("attempts", list(attempts))
        outer = OSError("all attempts to connect to 127.0.0.1:1 failed")
        outer.__cause__ = group
        handshake = HandshakeError()
        handshake.__cause__ = outer
        return handshake

    refused = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    unreachable = OSError(errno.ENETUNREACH, "unreachable")
    assert "refused" == failure_reason(wrapped(refused, ConnectionRefusedError(errno.ECONNREFUSED, "")))
    assert "network" == failure_reason(wrapped(refused, unreachable))
    assert "network" == failure_reason(HandshakeError())


def test_cli_without_a_server_gives_no_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listening at --url: the table says "nothing connected" (not "complete"),
    counts the handshakes as refused, prints no integrity verdict and no generator
    figure, ends with the warning that nothing connected, and exits 1."""
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["fanout", "--url", f"ws://127.0.0.1:{port}", "--duration", "1", "--quiet"]
    assert 1 == cli.main(argv)
    out = capsys.readouterr().out
    assert "nothing connected" in out.splitlines()[0]
    assert "complete" not in out
    assert "failed.refused" in out and "failed.network" not in out
    assert "integrity" not in out
    assert "generator CPU" not in out and "of a core" not in out
    assert out.rstrip().endswith("no connection could be opened: is the server running at --url?")


# -- the command line -----------------------------------------------------------------


async def test_cli_json_and_plot(
    nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints one JSON object with the figures; --plot writes a PNG."""
    fake = await start_fake(nursery)
    png = tmp_path / "latency.png"
    argv = [
        "dm",
        "--url",
        f"ws://127.0.0.1:{fake.port}",
        "--pairs",
        "2",
        "--duration",
        "1",
        "--json",
        "--plot",
        str(png),
        "--quiet",
    ]
    with trio.fail_after(RUN_LIMIT):
        status = await trio.to_thread.run_sync(cli.main, argv)
    figures = json.loads(capsys.readouterr().out)
    assert 0 == status, (figures["violations"], figures["warnings"], figures["counters"])
    assert figures["traffic"]["dm"]["sent"] > 0
    assert str(png) == figures["plot"]
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("name", ["missing/latency.png", "a-directory", "latency"])
def test_cli_refuses_a_plot_path_it_cannot_write_before_the_run(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--plot in a directory that does not exist, naming a directory, or without a suffix
    (matplotlib would write NAME.png instead) is a usage error before anything connects,
    not a warning after the whole run."""
    (tmp_path / "a-directory").mkdir()
    with socket.socket() as sock:  # a port nobody listens on: the run must not start at all
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["dm", "--url", f"ws://127.0.0.1:{port}", "--plot", str(tmp_path / name), "--quiet"]
    assert 2 == cli.main(argv)
    captured = capsys.readouterr()
    assert "" == captured.out
    assert captured.err.startswith("aleatoria-loadtest: error: --plot")
    assert 1 == len(captured.err.splitlines())
    assert [tmp_path / "a-directory"] == list(tmp_path.iterdir())


async def test_cli_table_and_processes(nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]) -> None:
    """--processes 2 spreads rooms over two spawned workers whose figures are merged;
    without --json the summary is a table."""
    fake = await start_fake(nursery)
    argv = [
        "fanout",
        "--url",
        f"ws://127.0.0.1:{fake.port}",
        "--rooms",
        "2",
        "--members",
        "2",
        "--duration",
        "1",
        "--processes",
        "2",
        "--progress-interval",
        "0.2",
    ]
    with trio.fail_after(RUN_LIMIT):
        status = await trio.to_thread.run_sync(cli.main, argv)
    captured = capsys.readouterr()
    assert 0 == status, captured.out
    assert "2 process(es)" in captured.out
    assert "Room messages" in captured.out
    assert "integrity: no loss" in captured.out
    assert "progress phase=" in captured.err
    assert 2 == len(fake.rooms.keys() - {"Lobby"})


async def test_ctrl_c_prints_partial_report_and_exits_130(nursery: trio.Nursery) -> None:
    """SIGINT during the load phase: the tool drains, prints a partial JSON report and
    exits 130 — as a real subprocess, started through scripts/loadtest.py."""
    fake = await start_fake(nursery)
    command = [
        sys.executable,
        str(REPO / "scripts" / "loadtest.py"),
        "fanout",
        "--url",
        f"ws://127.0.0.1:{fake.port}",
        "--rooms",
        "1",
        "--members",
        "2",
        "--duration",
        "600",
        "--json",
        "--progress-interval",
        "0.1",
    ]
    with trio.fail_after(RUN_LIMIT):
        process = await nursery.start(
            functools.partial(
                trio.run_process,
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
                cwd=REPO,
            )
        )
        assert process.stderr is not None and process.stdout is not None
        seen = b""
        while not _sending(seen):
            chunk = await process.stderr.receive_some()
            assert chunk, seen
            seen += chunk
        process.send_signal(signal.SIGINT)
        output = b""
        while chunk := await process.stdout.receive_some():
            output += chunk
        status = await process.wait()
    figures = json.loads(output)
    assert 130 == status
    assert figures["interrupted"]
    assert figures["traffic"]["room"]["sent"] > 0
    assert 0 == figures["traffic"]["room"]["lost"]


def _sending(stderr: bytes) -> bool:
    """Whether a complete progress line shows the load phase with messages going out."""
    for line in stderr.decode().splitlines(keepends=True):
        fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
        sending = fields.get("out/s", "0") != "0"
        if line.endswith("\n") and fields.get("phase") == "load" and sending:
            return True
    return False


def test_entry_points_show_help() -> None:
    """`python -m aleatoria.loadtest` and scripts/loadtest.py run the same program."""
    for command in (
        [sys.executable, "-m", "aleatoria.loadtest", "--help"],
        [sys.executable, str(REPO / "scripts" / "loadtest.py"), "match", "--help"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60)
        assert 0 == done.returncode, done.stderr
        assert "aleatoria-loadtest" in done.stdout


# -- against the real server ----------------------------------------------------------

REAL_SIZES: dict[str, dict[str, Any]] = {
    "fanout": {"rooms": 2, "members": 3, "senders": 2, "window": 4},
    "dm": {"pairs": 3},
    "match": {"users": 6},
    "conns": {"connections": 40, "duration": 0.5},
    "soak": {
        "duration": 1.5,
        "rooms": 1,
        "members": 3,
        "senders": 1,
        "rate": 40,
        "pairs": 2,
        "dm_rate": 20,
        "users": 4,
        "match_pause": 0.05,
    },
}


async def start_real(nursery: trio.Nursery, **config: Any) -> str:
    from aleatoria.config import Config
    from aleatoria.server import serve

    port = await nursery.start(
        serve, Config(port=0, **{"rate_limit": 0, "match_rate": 0, "frame_rate": 0, **config})
    )
    return f"ws://127.0.0.1:{port}"


@pytest.mark.parametrize("scenario", sorted(REAL_SIZES))
async def test_real_server_keeps_every_guarantee(nursery: trio.Nursery, scenario: str) -> None:
    """Against our server (rate limit off) each scenario sees no loss, duplicate,
    reordering, double match or pairing disagreement, and no connection trouble."""
    url = await start_real(nursery)
    options = validate(Options(scenario=scenario, url=url, **{"duration": 1.0, **REAL_SIZES[scenario]}))
    with trio.fail_after(RUN_LIMIT):
        figures = summarize(await run_inline(options))
    assert {} == figures["violations"]
    assert {} == figures["server_errors"]
    connections = figures["connections"]
    assert options.connection_count() == connections["opened"]
    assert (0, 0) == (connections["failed"], connections["closed_by_server"])
    for traffic in figures["traffic"].values():
        assert traffic["sent"] > 0
        assert traffic["expected"] == traffic["delivered"]
    if "match" in figures:
        assert figures["match"]["completed"] > 0
        assert 0 == figures["match"]["stalled"]
    if scenario == "conns":
        assert 40 == connections["alive"]


async def test_real_server_at_level_2(nursery: trio.Nursery) -> None:
    """``--level 2``: every connection opens with v=2 (welcome first, presence events among
    the room frames) and fan-out keeps every guarantee."""
    url = await start_real(nursery)
    options = validate(
        Options(scenario="fanout", url=url, level=2, **{"duration": 1.0, **REAL_SIZES["fanout"]})
    )
    with trio.fail_after(RUN_LIMIT):
        figures = summarize(await run_inline(options))
    assert {} == figures["violations"]
    assert {} == figures["server_errors"]
    assert options.connection_count() == figures["connections"]["opened"]


async def test_real_server_rate_limit_is_reported(nursery: trio.Nursery) -> None:
    """With the server's default rate limit on, an unpaced sender's refusals are
    counted as ``rate_limited`` and the report says benchmarks need it off."""
    url = await start_real(nursery, rate_limit=5.0, rate_burst=5)
    options = validate(
        Options(scenario="fanout", url=url, duration=1.0, rooms=1, members=2, drain_timeout=1.0)
    )
    with trio.fail_after(RUN_LIMIT):
        figures = summarize(await run_inline(options))
    assert figures["traffic"]["room"]["refused"] > 0
    assert any("--rate-limit 0" in w for w in figures["warnings"])


async def test_real_server_subprocess_with_worker_processes(nursery: trio.Nursery) -> None:
    """The real thing end to end: `aleatoria serve --port 0 --rate-limit 0` in its own
    process, the tool in another with two worker processes and --server-pid."""
    server = await nursery.start(
        functools.partial(
            trio.run_process,
            [
                sys.executable,
                "-m",
                "aleatoria",
                "serve",
                "--port",
                "0",
                "--rate-limit",
                "0",
                "--match-rate",
                "0",
            ],
            stderr=subprocess.PIPE,
            check=False,
            cwd=REPO,
        )
    )
    assert server.stderr is not None
    with trio.fail_after(RUN_LIMIT):
        log = b""
        while (found := re.search(rb"listening on ws://127\.0\.0\.1:(\d+)", log)) is None:
            chunk = await server.stderr.receive_some()
            assert chunk, log
            log += chunk
        port = int(found.group(1))
        # Keep reading the server's log so that its pipe never fills up.
        nursery.start_soon(_drain, server.stderr)
        tool = await trio.run_process(
            [
                sys.executable,
                "-m",
                "aleatoria.loadtest",
                "soak",
                "--url",
                f"ws://127.0.0.1:{port}",
                "--duration",
                "2",
                "--processes",
                "2",
                "--server-pid",
                str(server.pid),
                "--json",
                "--quiet",
                "--rooms",
                "2",
                "--members",
                "3",
                "--pairs",
                "2",
                "--users",
                "4",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=REPO,
        )
    server.send_signal(signal.SIGTERM)
    assert 0 == tool.returncode, tool.stderr.decode()
    figures = json.loads(tool.stdout)
    assert 2 == figures["processes"]
    assert figures["integrity_ok"], figures["violations"]
    assert 2 * 3 + 2 * 2 + 4 == figures["connections"]["opened"]
    assert figures["match"]["completed"] > 0
    assert figures["server"]["available"]
    assert figures["server"]["rss_peak_mib"] > 0


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some():
        pass
