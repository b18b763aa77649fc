"""The pure search rules (PROTOCOL.md section 12, ``aleatoria.search``): profile parsing, and
with hypothesis, any sequence of arrivals, searches, cancels, disconnects, blocks, unblocks
and clock steps on ``Search`` keeps the invariant (no compatible pair waits), never makes a
match that breaks a rule, never passes over an older compatible searcher, and times everyone
out."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aleatoria import search as search_module
from aleatoria.errors import ClientError
from aleatoria.matchmaking import Matchmaker
from aleatoria.safety import either
from aleatoria.search import (
    SCAN_LIMIT,
    Candidate,
    Profile,
    Search,
    SearchRules,
    common,
    compatible,
    on_change,
    parse_profile,
)
from aleatoria.store.memory_safety import MemorySafety

RULES = SearchRules(timeout=120.0, interest_wait=10.0, cooldown=300.0)
USERS = [f"u{i}" for i in range(8)]
TAGS = ["music", "chess", "films", "golf"]


def test_profiles_are_normalised() -> None:
    assert Profile(("music", "films"), "en", True) == parse_profile([" Music", "FILMS", "music"], "EN", True)
    assert Profile() == parse_profile(None, None, None)


@pytest.mark.parametrize(
    ("interests", "language", "only", "code"),
    [
        ("music", None, None, "invalid_payload"),
        ([""], None, None, "invalid_payload"),
        ([f"t{i}" for i in range(11)], None, None, "too_large"),
        (["x" * 33], None, None, "too_large"),
        (None, "eng", None, "invalid_payload"),
        (None, "zz", None, "invalid_payload"),
        (None, None, 1, "invalid_payload"),
    ],
)
def test_bad_profiles(interests: object, language: object, only: object, code: str) -> None:
    with pytest.raises(ClientError) as raised:
        parse_profile(interests, language, only)
    assert code == raised.value.code


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


profiles = st.builds(
    Profile,
    st.lists(st.sampled_from(TAGS), max_size=2, unique=True).map(tuple),
    st.sampled_from([None, None, "en", "fr"]),
    st.booleans(),
)
actions = st.lists(
    st.one_of(
        st.tuples(st.just("search"), st.sampled_from(USERS), profiles),
        st.tuples(st.just("pool"), st.sampled_from(USERS), profiles),
        st.tuples(st.just("cancel"), st.sampled_from(USERS), st.none()),
        st.tuples(st.just("gone"), st.sampled_from(USERS), st.none()),
        st.tuples(st.just("block"), st.sampled_from(USERS), st.sampled_from(USERS)),
        # Among a few users, so that a pair blocked, then both searching, then unblocked is
        # common.
        st.tuples(st.just("block"), st.sampled_from(USERS[:3]), st.sampled_from(USERS[:3])),
        st.tuples(st.just("unblock"), st.sampled_from(USERS[:3]), st.sampled_from(USERS[:3])),
        st.tuples(st.just("wait"), st.sampled_from([0.5, 3.0, 10.0, 60.0, 200.0]), st.none()),
    ),
    max_size=40,
)


def _apply(step: tuple[str, object, object], search: Search, safety: MemorySafety, clock: Clock) -> None:
    """One of ``actions``' steps, as a client (or the passing time) makes it."""
    kind, a, b = step
    if kind == "search":
        search.search(str(a), None, b)  # type: ignore[arg-type]
    elif kind == "pool":
        search.set_available(str(a), b)  # type: ignore[arg-type]
    elif kind == "cancel":
        search.cancel(str(a))
    elif kind == "gone":
        search.disconnect(str(a))
    elif kind == "block":
        if a != b:
            safety.block_now(str(a), str(b))
    elif kind == "unblock":  # both ways: the pair is then free
        safety.unblock_now(str(a), str(b))
        safety.unblock_now(str(b), str(a))
    else:
        clock.now += float(a)  # type: ignore[arg-type]
        search.tick()


@settings(max_examples=300, deadline=None)
@given(actions)
@example(
    [("block", "u0", "u1"), ("search", "u0", Profile()), ("search", "u1", Profile()), ("unblock", "u1", "u0")]
)
def test_every_step_keeps_the_rules(steps: list[tuple[str, object, object]]) -> None:
    clock = Clock()
    safety = MemorySafety()
    matchmaker = Matchmaker(random.Random(1), safety)
    search = Search(matchmaker, RULES, clock, random.Random(2))
    safety.on_unblock = search.recheck  # as the memory store wires them
    partners: dict[tuple[str, str], float] = {}
    for kind, a, b in steps:
        before = {c.user: c for c in search.queue()}
        pooled_before = {c.user: c for c in search.pooled()}
        _apply((kind, a, b), search, safety, clock)
        now = clock.now
        events = search.events()
        waiting = {**pooled_before, **before}
        if kind in ("search", "pool"):  # the newcomer, as it arrived
            waiting[str(a)] = Candidate(str(a), b, now, kind == "search")  # type: ignore[arg-type]
        for match in events.matches:
            x, y = waiting.get(match.impolite), waiting.get(match.polite)
            assert x is not None and y is not None
            key = (min(x.user, y.user), max(x.user, y.user))
            if (x.searcher or y.searcher) and key in partners:
                assert now - partners[key] >= RULES.cooldown, f"rematch within the cooldown: {key}"
            partners[key] = now
            assert match.common == common(x.profile, y.profile)
            assert x.searcher, "the served side is a searcher"
            # Fairness: no searcher older than the served one was compatible with its partner.
            for older in before.values():
                if older.since < x.since and older.user not in (x.user, y.user):
                    assert not compatible(older, y, now, RULES, search), (older, x, y)
            matchmaker.disconnect(match.impolite)
            matchmaker.disconnect(match.polite)
        for user in events.timeouts:
            gone = before.get(user)
            assert gone is not None and now - gone.since >= RULES.timeout
        # The invariant: no compatible pair among searchers, nor searcher and pooled user.
        queue = search.queue()
        pooled = search.pooled()
        for i, s in enumerate(queue):
            assert now - s.since < RULES.timeout
            for other in [*queue[i + 1 :], *pooled]:
                assert not compatible(s, other, now, RULES, search), (s, other)


def test_interest_wait_widens_only_at_its_end() -> None:
    clock = Clock()
    search = Search(Matchmaker(random.Random(3)), RULES, clock)
    search.search("a", None, Profile(("chess",)))
    search.search("b", None, Profile(("golf",)))
    assert () == search.events().matches
    assert RULES.interest_wait == search.next_due()
    clock.now = RULES.interest_wait
    search.tick()
    [match] = search.events().matches
    assert ("a", "b", (), ("a", "b")) == (match.impolite, match.polite, match.common, match.fallback)


def test_candidates_prefer_common_interests_then_wait() -> None:
    x = Candidate("x", Profile(("a", "b")), 0.0, True)
    one = Candidate("one", Profile(("a",)), 0.0, False)
    two = Candidate("two", Profile(("a", "b")), 5.0, False)
    clock = Clock()
    search = Search(Matchmaker(random.Random(4)), RULES, clock)
    clock.now = 6.0
    search.set_available("one", one.profile)
    search.set_available("two", two.profile)
    search.search("x", None, x.profile)
    [match] = search.events().matches
    assert ("x", "two", ("a", "b")) == (match.impolite, match.polite, match.common)


def test_unblocking_matches_the_pair_at_once() -> None:
    """A block kept two searchers apart; removing it matches them (the older served)
    without a clock step."""
    clock = Clock()
    safety = MemorySafety()
    search = Search(Matchmaker(random.Random(5), safety), RULES, clock)
    safety.on_unblock = search.recheck
    safety.block_now("b", "a")
    search.search("a", None, Profile())
    clock.now = 1.0
    search.search("b", None, Profile())
    assert () == search.events().matches
    safety.unblock_now("b", "a")
    [match] = search.events().matches
    assert ("a", "b") == (match.impolite, match.polite)


class WholeQueue(Search):
    """The reference: ``on_change`` given the whole queue and the whole pool, as before the
    queue had indexes."""

    def _meetable(self, x: Candidate, now: float) -> list[Candidate]:
        return self.queue()

    def _pool_for(self, x: Candidate, now: float) -> list[Candidate]:
        return self.pooled()


@settings(max_examples=300, deadline=None)
@given(actions)
# Two pooled at the same moment: the searcher takes the first by name, not by arrival.
@example([("pool", "u2", Profile()), ("pool", "u1", Profile()), ("search", "u0", Profile())])
# A searcher whose interest wait passed (looked at by the tick, still alone) meets anyone.
@example([("search", "u0", Profile(("music",))), ("wait", 10.0, None), ("search", "u1", Profile())])
def test_the_indexes_decide_as_the_whole_queue(steps: list[tuple[str, object, object]]) -> None:
    """``Search`` reads the queue and the pool through its indexes; it makes the same
    matches and timeouts, step by step, as ``on_change`` given everyone."""
    clocks = Clock(), Clock()
    safeties = MemorySafety(), MemorySafety()
    searches = [
        kind(Matchmaker(random.Random(1), safety), RULES, clock, random.Random(2))
        for kind, safety, clock in zip((Search, WholeQueue), safeties, clocks, strict=True)
    ]
    for safety, search in zip(safeties, searches, strict=True):
        safety.on_unblock = search.recheck
    for kind, a, b in steps:
        seen = []
        for clock, safety, search in zip(clocks, safeties, searches, strict=True):
            _apply((kind, a, b), search, safety, clock)
            events = search.events()
            for match in events.matches:
                search.mm.disconnect(match.impolite)
                search.mm.disconnect(match.polite)
            matches = [(m.impolite, m.polite, m.common, m.fallback, m.waited) for m in events.matches]
            seen.append((matches, events.timeouts, search.queue(), search.pooled(), search.next_due()))
        assert seen[1] == seen[0]


class _Counting(Search):
    """The real ``Search``, counting the block checks (``World.barred``) its decisions make."""

    checks = 0

    def barred(self, a: str, b: str) -> bool:
        self.checks += 1
        return super().barred(a, b)


def test_a_search_looks_only_at_those_who_may_match_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """One address kept 600 connections searching with interestsOnly and disjoint interests
    at the match rate (a red-team run): each search looked at every searcher queued (0.9 ms
    at 1,000), which took most of a core and a calm client's ping p99 from 24 to 248 ms. A
    search now looks only at those who may match it: with 1,000 such searchers queued, a
    searcher searching again is handed itself alone."""
    handed: list[int] = []

    def recorded(queue: Sequence[Candidate], pool: Sequence[Candidate], *rest: Any) -> Any:
        handed.append(len(queue) + len(pool))  # what the decision looks at
        return on_change(queue, pool, *rest)

    monkeypatch.setattr(search_module, "on_change", recorded)
    search = Search(Matchmaker(random.Random(6)), RULES, Clock())
    for i in range(1000):
        search.search(f"u{i}", None, Profile((f"t{i}",), None, True))
    handed.clear()
    for i in range(100):
        search.search(f"u{i}", None, Profile((f"t{i}",), None, True))
        search.tick()
    assert handed and max(handed) == 1  # itself
    # One who shares an interest is still found, and matched.
    search.search("fan", None, Profile(("t500",), None, True))
    assert [{"u500", "fan"}] == [{m.impolite, m.polite} for m in search.events().matches]


def test_many_blocks_cost_a_match_check_nothing() -> None:
    """Whether two users are blocked either way is asked of every candidate a search or a pick
    looks at. It built the union of both users' blocks and blockers each time, so a queue
    kept by one address's searchers that had all blocked each other (1,000 blocks each, set
    up within the rate limit) cost 19.5 ms per search at 1,000 such searchers. The union is
    now a view over the two sets: a block added after it was taken shows in it."""
    blocks, blockers = {f"c{i}" for i in range(1000)}, {f"d{i}" for i in range(1000)}
    view = either(blocks, blockers)
    assert view is not None and "c999" in view and "d999" in view and "x" not in view
    blocks.add("late")  # a copy would not see it
    assert "late" in view
    assert 2001 == len(view) and {"late", "c0", "d0"} <= set(view)
    safety = MemorySafety()
    search = Search(Matchmaker(random.Random(7), safety), RULES, Clock())
    for other in ("c0", "c999"):
        safety.block_now("many", other)
        safety.block_now(other, "many")
    assert search.barred("many", "c999") and search.barred("c999", "many")
    assert not search.barred("many", "x")


def test_a_search_looks_at_a_bounded_number_of_searchers_turned_away() -> None:
    """Searchers who may match a search for their interests but are turned away for another
    reason (here: blocks) cost a check each; as in the Redis store, a search looks at
    ``SCAN_LIMIT`` of them at most in each walk (it was 2 ms a search at 1,000, a check each)."""
    assert SCAN_LIMIT == 64
    safety = MemorySafety()
    search = _Counting(Matchmaker(random.Random(8), safety), RULES, Clock())
    users = [f"u{i}" for i in range(1000)]
    for user in users:
        for other in users:
            if other != user:
                safety.block_now(user, other)
        search.search(user, None, Profile())
    search.checks = 0
    search.search(users[500], None, Profile())  # older searchers on one side, newer on the other
    assert 0 < search.checks <= 3 * SCAN_LIMIT
    assert not search.events().matches
