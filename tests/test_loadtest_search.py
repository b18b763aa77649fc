"""The load-test tool's ``search`` scenario (PROTOCOL.md section 12): its pure checks on
made-up rows, the scenario against a fake server that is fair or broken on purpose
(``loadtest_fakeserver``), the CLI's table, ``--json`` and ``--plot``, and a short run
against the real server in memory mode."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from loadtest_fakeserver import FakeServer, Faults

from aleatoria.loadtest import cli
from aleatoria.loadtest.inline import run_inline
from aleatoria.loadtest.options import Options, OptionsError, validate
from aleatoria.loadtest.searchcheck import Row, Rules, analyse, draw_profile
from aleatoria.loadtest.summary import exit_code, summarize

pytestmark = pytest.mark.loopback  # the load-test tool (not a server test) against real servers

RUN_LIMIT = 60  # seconds: a hung run fails the test instead of hanging the suite
RULES = Rules(interest_wait=10.0, cooldown=300.0, slack=1.0)


# -- pure: profiles and the run-wide checks -------------------------------------------


def test_profiles_follow_the_popularity_and_are_reproducible() -> None:
    """Each user gets distinct interests, the most popular tag most often; the same seed
    gives the same profile; languages are drawn from the list, "any" being none."""
    counts: Counter[str] = Counter()
    for user in range(2000):
        tags, language = draw_profile(random.Random(user), 20, 3, 1.0, ["en", None])
        assert 3 == len(set(tags))
        assert language in {"en", None}
        counts.update(tags)
    assert counts["t0"] > counts["t5"] > counts["t19"]
    assert draw_profile(random.Random("x"), 50, 4, 1.2, ["fr"]) == draw_profile(
        random.Random("x"), 50, 4, 1.2, ["fr"]
    )
    assert ([], None) == draw_profile(random.Random(1), 5, 0, 1.0, [])


def searched(user: str, sent: float, joined: float, **rest: Any) -> Row:
    return Row(user, rest.pop("interests", []), rest.pop("language", None), sent, joined, **rest)


def matched(a: Row, b: Row, match_id: str, sent_at: float, arrived: float) -> list[list[Any]]:
    """Both rows of a match between searchers ``a`` (served) and ``b``."""
    common = [tag for tag in a.interests if tag in b.interests]
    for row, peer, role in ((a, b, "impolite"), (b, a, "polite")):
        row.end, row.left, row.peer, row.role, row.match_id, row.common = (
            "match",
            arrived,
            peer.user,
            role,
            match_id,
            common,
        )
    assert max(a.sent, b.sent) <= sent_at
    return [a.to_list(), b.to_list()]


def test_a_fair_queue_has_no_violation() -> None:
    """The oldest searcher gets the newcomer; an incompatible older one (another language)
    waiting meanwhile is not passed over."""
    y = searched("y", 0.0, 0.01, language="fr", end="cancel", left=50.0)
    a = searched("a", 1.0, 1.01, language="en")
    b = searched("b", 2.0, 2.01, language="en")
    rows = [y.to_list(), *matched(a, b, "m1", 2.0, 2.02)]
    assert {"unfair": 0, "rematches": 0, "mismatched": 0, "fairness_checked": 1} == {
        k: analyse(rows, RULES)[k] for k in ("unfair", "rematches", "mismatched", "fairness_checked")
    }


def test_an_older_compatible_searcher_passed_over_is_unfair() -> None:
    """``y`` waited longer than ``a`` and could take ``b``: the match (a, b) is unfair.
    The same when ``y`` could take ``a`` and shares as many interests with it as ``b``."""
    y = searched("y", 0.0, 0.01, end="cancel", left=50.0)
    a = searched("a", 1.0, 1.01, language="en")
    b = searched("b", 2.0, 2.01)
    figures = analyse([y.to_list(), *matched(a, b, "m1", 2.0, 2.02)], RULES)
    assert (1, 1) == (figures["unfair"], figures["passed_over"])
    assert [{"matchId": "m1", "served": "a", "partner": "b", "passed_over": ["y"]}] == figures[
        "unfair_examples"
    ]

    a = searched("a", 0.0, 0.01, interests=["go"])
    y = searched("y", 1.0, 1.01, interests=["go"], end="cancel", left=50.0)
    b = searched("b", 2.0, 2.01, interests=["go", "chess"])
    assert 1 == analyse([y.to_list(), *matched(a, b, "m2", 2.0, 2.02)], RULES)["unfair"]


def test_doubt_is_never_a_violation() -> None:
    """Not counted: a searcher whose reply came after the newcomer's request was sent, one
    that may have left before the match, and one whose interest wait may not have run out
    (the fallback) or whose cooldown with the newcomer may still run."""
    a = searched("a", 1.0, 1.01)
    b = searched("b", 2.0, 2.01)
    late = searched("late", 1.5, 2.5, end="cancel", left=50.0)  # "searching" after b sent
    gone = searched("gone", 0.0, 0.01, end="timeout", left=2.5)  # left within the slack
    picky = searched("picky", 0.0, 0.01, interests=["golf"], end="cancel", left=50.0)  # waited 2 s < 10 + 1
    rows = [late.to_list(), gone.to_list(), picky.to_list(), *matched(a, b, "m1", 2.0, 2.02)]
    assert 0 == analyse(rows, RULES)["unfair"]

    # A cooldown: "y" met "b" at t=0.5, so it may not take b at t=2 (nor a: another language).
    y = searched("y", 0.1, 0.11, language="fr")
    b0 = searched("b", 0.4, 0.41)
    y2 = searched("y", 0.6, 0.61, language="fr", end="cancel", left=50.0)
    a = searched("a", 1.0, 1.01, language="en")
    b = searched("b", 2.0, 2.01)
    rows = [*matched(y, b0, "m0", 0.5, 0.52), y2.to_list(), *matched(a, b, "m1", 2.0, 2.02)]
    assert 0 == analyse(rows, RULES)["unfair"]


def test_rematches_and_mismatched_pairings_are_found() -> None:
    """A pair matched twice within the cooldown is a rematch; a matchId seen once, or with
    sides that disagree, is a pairing mismatch."""
    rows = [
        *matched(searched("a", 0.0, 0.01), searched("b", 0.1, 0.11), "m1", 0.1, 0.12),
        *matched(searched("a", 5.0, 5.01), searched("b", 5.1, 5.11), "m2", 5.1, 5.12),
    ]
    lonely = searched(
        "c", 0.0, 0.01, end="match", left=1.0, peer="d", role="impolite", match_id="m3", common=[]
    )
    same_role = matched(searched("e", 0.0, 0.01), searched("f", 0.0, 0.01), "m4", 0.0, 0.02)
    same_role[1][8] = "impolite"  # both sides think they were served
    figures = analyse([*rows, lonely.to_list(), *same_role], RULES)
    assert (1, 2) == (figures["rematches"], figures["mismatched"])


def test_blocks_interests_only_and_unheard_matches_are_not_compatible() -> None:
    """What the search storms add: a blocked pair (``barred``), a side that asked for
    ``interestsOnly`` without a common interest, and a pair that met in a match only one side
    heard (within the cooldown) are never counted as passed over; without them, ``y`` is."""
    y = searched("y", 0.0, 0.01, interests=["go"], language="fr", end="cancel", left=50.0)
    a = searched("a", 13.0, 13.01, language="en")  # y cannot take a: another language
    b = searched("b", 14.0, 14.01)  # by then y's interest wait (10 + 1 s) ran out
    rows = [*matched(a, b, "m1", 14.0, 14.02)]
    assert 1 == analyse([y.to_list(), *rows], RULES)["unfair"]
    assert (
        0
        == analyse([y.to_list(), *rows], RULES, barred=lambda one, other: {one, other} == {"y", "b"})[
            "unfair"
        ]
    )
    picky = attrs.evolve(y, interests_only=True)
    assert 0 == analyse([picky.to_list(), *rows], RULES)["unfair"]
    heard_once = searched(
        "b", 0.2, 0.21, end="match", left=0.5, peer="y", role="polite", match_id="m0", common=[]
    )
    assert 0 == analyse([y.to_list(), heard_once.to_list(), *rows], RULES)["unfair"]


def test_a_known_timeout_bounds_a_timed_out_search_by_its_request() -> None:
    """With the server's timeout known, a timed-out search surely waited until its request's
    sending plus the timeout, however late its no_peer_available arrived."""
    y = searched("y", 0.0, 0.01, end="timeout", left=30.0)  # the reply arrived very late
    a = searched("a", 1.0, 1.01, language="en")
    b = searched("b", 2.0, 2.01)
    rows = [y.to_list(), *matched(a, b, "m1", 2.0, 2.02)]
    assert 1 == analyse(rows, RULES)["unfair"]  # left - slack: the doubtful, old bound
    assert 0 == analyse(rows, attrs.evolve(RULES, timeout=1.5))["unfair"]
    assert 1 == analyse(rows, attrs.evolve(RULES, timeout=3.0))["unfair"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"users": 1}, "--users"),
        ({"interests_per_user": 11}, "--interests-per-user"),
        ({"interests_per_user": 5, "vocabulary": 3}, "--interests-per-user"),
        ({"languages": "en,english"}, "--languages"),
        ({"zipf": -1.0}, "--zipf"),
        ({"fairness_slack": -0.5}, "--fairness-slack"),
    ],
)
def test_bad_search_options_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        validate(Options(scenario="search", **changes))


# -- against the fake server ------------------------------------------------------------


async def start_fake(nursery: trio.Nursery, faults: Faults | None = None) -> FakeServer:
    fake = FakeServer(faults or Faults())
    await nursery.start(fake.serve)
    return fake


async def run(fake: FakeServer, **changes: Any) -> dict[str, Any]:
    # The fake falls back at once and never forgets a partner: the tool is told so.
    settings = {
        "duration": 1.0,
        "drain_timeout": 2.0,
        "users": 8,
        "interest_wait": 0.0,
        "fairness_slack": 0.05,
    }
    options = validate(
        Options(scenario="search", url=f"ws://127.0.0.1:{fake.port}", **{**settings, **changes})
    )
    with trio.fail_after(RUN_LIMIT):
        return summarize(await run_inline(options))


async def test_search_against_a_fair_server(nursery: trio.Nursery) -> None:
    """Users search, talk and press Next; every match is checked and none breaks a rule;
    the queue is empty at the end and nobody is left in a call."""
    fake = await start_fake(nursery)
    figures = await run(fake, languages="en,fr,any", interests_per_user=2, vocabulary=4)
    search = figures["search"]
    assert search["matches"] > 0 and search["talks"] > 0
    assert search["fairness_checked"] > 0
    problems = ("double", "mismatch", "pairing_mismatches", "rematches", "unfair", "stalled", "bad_assign")
    assert dict.fromkeys(problems, 0) == {k: search[k] for k in problems}
    assert figures["integrity_ok"] and 0 == exit_code(figures)
    assert search["wait_ms"] is not None and search["wait_ms"]["p50"] <= search["wait_ms"]["p99"]
    assert 0.0 <= search["fallback_rate"] <= 1.0
    assert ({}, {}) == (fake.queue, fake.matches)


async def test_search_finds_an_unfair_queue(nursery: trio.Nursery) -> None:
    """A queue that serves its newest searchers while the oldest waits is caught. (No
    cooldown, so that users keep cycling for the whole run.)"""
    fake = await start_fake(nursery, Faults(unfair=True, rematch=True))
    figures = await run(fake, interests_per_user=0, cooldown=0.0)
    assert figures["search"]["unfair"] > 0
    assert "search.unfair" in figures["violations"] and 1 == exit_code(figures)
    assert figures["search"]["unfair_examples"]


async def test_search_finds_rematches(nursery: trio.Nursery) -> None:
    """A queue that ignores the rematch cooldown is caught."""
    fake = await start_fake(nursery, Faults(rematch=True))
    figures = await run(fake, interests_per_user=0, users=4)
    assert figures["search"]["rematches"] > 0
    assert "search.rematch" in figures["violations"]


async def test_search_finds_double_matches(nursery: trio.Nursery) -> None:
    """A queue that hands out users already in a call is caught as double matches."""
    fake = await start_fake(nursery, Faults(double_match=True))
    figures = await run(fake, interests_per_user=0, match_timeout=0.3)
    assert figures["search"]["double"] > 0
    assert not figures["integrity_ok"]


async def test_cli_search_table_json_and_plot(
    nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI's search scenario: the table names its figures; --json holds them; --plot
    writes a PNG with the wait and setup latencies."""
    fake = await start_fake(nursery)
    base = ["search", "--url", f"ws://127.0.0.1:{fake.port}", "--users", "6", "--duration", "0.5", "--quiet"]
    base += ["--interest-wait", "0", "--languages", "en,any"]
    with trio.fail_after(RUN_LIMIT):
        status = await trio.to_thread.run_sync(cli.main, base)
    table = capsys.readouterr().out
    assert 0 == status, table
    for words in ("Search queue", "matches /s", "wait p95 (ms)", "fallback rate", "rematches", "unfair"):
        assert words in table
    png = tmp_path / "search.png"
    with trio.fail_after(RUN_LIMIT):
        status = await trio.to_thread.run_sync(cli.main, [*base, "--json", "--plot", str(png)])
    figures = json.loads(capsys.readouterr().out)
    assert 0 == status, (figures["violations"], figures["warnings"])
    assert figures["search"]["matches"] > 0
    assert {"search.wait", "search.setup"} <= set(figures["latency_ms"])
    assert png.read_bytes().startswith(b"\x89PNG")


async def test_cli_search_shows_progress(nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]) -> None:
    """The search scenario's progress lines (not on a terminal) show its wait latency;
    the run ends normally."""
    fake = await start_fake(nursery)
    argv = ["search", "--url", f"ws://127.0.0.1:{fake.port}", "--users", "4", "--duration", "0.5"]
    argv += ["--interest-wait", "0", "--progress-interval", "0.05"]
    with trio.fail_after(RUN_LIMIT):
        status = await trio.to_thread.run_sync(cli.main, argv)
    captured = capsys.readouterr()
    assert 0 == status, captured.out
    assert "progress phase=" in captured.err
    assert "search.wait p50/p99 ms=" in captured.err


# -- against the real server --------------------------------------------------------------


async def test_real_server_search_keeps_the_rules(nursery: trio.Nursery) -> None:
    """Our server in memory mode (rate limits off): searchers with interests and languages
    are matched, every match checked, with no double match, rematch, pairing disagreement
    or unfair match. (The interest wait outlasts the run: a fallback would need the search
    task's timer, see tests/test_search_wakeup.py.)"""
    from aleatoria.config import Config
    from aleatoria.server import serve

    config = Config(port=0, rate_limit=0, match_rate=0, frame_rate=0, interest_wait=30.0)
    port = await nursery.start(serve, config)
    options = validate(
        Options(
            scenario="search",
            url=f"ws://127.0.0.1:{port}",
            duration=1.5,
            users=16,
            vocabulary=6,
            interests_per_user=2,
            languages="en,any",
            interest_wait=30.0,
        )
    )
    with trio.fail_after(RUN_LIMIT):
        figures = summarize(await run_inline(options))
    search = figures["search"]
    assert {} == figures["violations"], search["unfair_examples"]
    assert {} == figures["server_errors"]
    assert search["matches"] > 0 and search["fairness_checked"] == search["matches"]
    assert 0 == search["stalled"] + search["bad_assign"]
    assert (options.users, 0) == (figures["connections"]["opened"], figures["connections"]["failed"])
