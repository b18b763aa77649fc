"""The memory store's count of reports filed per user and hour (PROTOCOL.md section 13,
``ALEATORIA_REPORTS_PER_HOUR``): a fixed window of an hour from a user's first report, per
user (not per connection), and bounded -- one entry per user, ``max_users`` in all -- also
against a client that makes up user ids."""

from __future__ import annotations

import json
import tracemalloc

from aleatoria.safety import REPORT_WINDOW as HOUR
from aleatoria.store.memory_reports import ReportCounts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_user_files_limit_reports_in_the_hour_from_its_first() -> None:
    clock = Clock()
    counts = ReportCounts(clock)
    assert [True, True, True] == [counts.add("alice", 3) for _ in range(3)]
    assert counts.add("alice", 3) is False  # refused: nothing counted
    assert counts.add("bob", 3) is True  # another user's count is its own
    clock.now += HOUR - 1
    assert counts.add("alice", 3) is False  # still the hour of her first report
    clock.now += 1  # that hour is over: a new one opens with this report
    assert [True, True, True, False] == [counts.add("alice", 3) for _ in range(4)]


def test_sweep_forgets_users_whose_hour_is_over_and_keeps_the_rest() -> None:
    clock = Clock()
    counts = ReportCounts(clock)
    for user in ("u1", "u2", "u3"):
        counts.add(user, 5)
        clock.now += 100
    counts.add("u1", 5)  # counted in u1's window: it keeps its place (the first)
    clock.now = 1000.0 + HOUR + 150  # u1's and u2's hours are over, u3's is not
    assert 2 == counts.sweep()
    assert 1 == len(counts)
    assert 0 == counts.sweep()
    clock.now += HOUR
    assert 1 == counts.sweep()
    assert 0 == len(counts)


def test_made_up_user_ids_cannot_grow_it_past_its_bound() -> None:
    """50,000 user ids within one hour: at most ``max_users`` are held; the users whose
    window opened first are forgotten first, the most recent never."""
    clock = Clock()
    counts = ReportCounts(clock, max_users=10_000)
    for n in range(50_000):
        counts.add(f"u{n}", 1)
        clock.now += 0.001
    assert 10_000 == len(counts)
    assert 40_000 == counts.forgotten
    assert counts.add("u49999", 1) is False  # the most recent user is kept
    assert counts.add("u0", 1) is True  # forgotten: its count started again


def test_note_keeps_what_another_store_counted() -> None:
    """What Redis counted goes on in memory during an outage: the count and the window's end."""
    clock = Clock()
    counts = ReportCounts(clock)
    counts.note("alice", 1, HOUR)  # Redis opened her window now
    counts.note("alice", 2, HOUR - 60)
    assert counts.add("alice", 3) is True
    assert counts.add("alice", 3) is False
    clock.now += HOUR - 60  # her window (in Redis' time) is over
    assert counts.add("alice", 3) is True
    counts.note("bob", 3, 10.0)  # refused in Redis: noted as the limit, ending in 10 s
    assert counts.add("bob", 3) is False
    clock.now += 10
    assert counts.add("bob", 3) is True


def test_an_entry_costs_what_the_docs_say() -> None:
    """``memory_reports`` says about 240 bytes a user with 16-character ids (the ids come
    from parsed JSON, one string each, as in a server)."""
    clock = Clock()
    counts = ReportCounts(clock)
    names = [json.loads(json.dumps(f"user-{n:011d}")) for n in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for name in names:
            clock.now += 0.001  # a time of its own each, as in a server
            counts.add(name, 30)
            counts.add(name, 30)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    per_user = (used + sum(len(name) + 49 for name in names)) / 20_000
    assert per_user < 260, per_user
