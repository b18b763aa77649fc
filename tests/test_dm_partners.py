"""The memory store's count of new DM partners per user and hour (PROTOCOL.md section 16):
per user (not per connection), freed an hour after each first write, and bounded -- per user
by the limit, in all by ``max_entries`` -- also against a client that makes up user ids."""

from __future__ import annotations

import json
import tracemalloc

from aleatoria.safety import NEW_DM_WINDOW as HOUR
from aleatoria.store.memory_partners import DmPartners


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_user_has_limit_new_partners_an_hour() -> None:
    clock = Clock()
    partners = DmPartners(clock)
    assert [0.0, 0.0, 0.0] == [partners.add("alice", p, 3) for p in ("p1", "p2", "p3")]
    assert partners.add("alice", "p4", 3) is None  # refused: nothing counted
    assert 3 == partners.entries
    clock.now += 600
    assert 600.0 == partners.add("alice", "p1", 3)  # known: how long ago it was first
    assert 0.0 == partners.add("bob", "p4", 3)  # another user's count is its own
    clock.now = 1000.0 + HOUR  # the first three are an hour old: they no longer count
    assert 0.0 == partners.add("alice", "p4", 3)
    assert 0.0 == partners.add("alice", "p1", 3)  # written to again: new again
    assert 2 == len(partners._users["alice"])  # the old entries were dropped, not kept


def test_sweep_forgets_users_idle_for_an_hour_and_keeps_the_rest() -> None:
    clock = Clock()
    partners = DmPartners(clock)
    for user in ("u1", "u2", "u3"):
        partners.add(user, "x", 5)
        partners.add(user, "y", 5)
        clock.now += 100
    partners.add("u1", "z", 5)  # u1 is the most recent now
    clock.now = 1200.0 + HOUR  # u2's and u3's partners are an hour old, u1's z is not
    assert 2 == partners.sweep()
    assert 1 == len(partners)
    # u1's x and y are an hour old: held until the user is full or idle (at most the limit).
    assert 3 == partners.entries
    assert 0.0 == partners.add("u1", "x", 5)  # new again
    assert 3 == partners.entries
    clock.now += HOUR
    assert 1 == partners.sweep()
    assert (0, 0) == (len(partners), partners.entries)


def test_made_up_user_ids_cannot_grow_it_past_its_bound() -> None:
    """50,000 user ids, 4 partners each, within one hour: at most ``max_entries`` are held;
    the users who wrote least recently are forgotten first, the most recent never."""
    clock = Clock()
    partners = DmPartners(clock, max_entries=10_000)
    for n in range(50_000):
        for p in range(4):
            partners.add(f"u{n}", f"p{p}", 200)
        assert partners.entries <= 10_000
        clock.now += 0.001
    assert 10_000 == partners.entries
    assert 2_500 == len(partners)
    assert 47_500 == partners.forgotten
    age = partners.add("u49999", "p0", 200)
    assert age is not None and 0.0 < age  # the most recent user is kept


def test_note_keeps_what_another_store_counted_within_the_limit() -> None:
    clock = Clock()
    partners = DmPartners(clock)
    partners.note("alice", "p1", 300.0, 2)
    assert 300.0 == partners.add("alice", "p1", 2)
    partners.note("alice", "p2", 0.0, 2)
    partners.note("alice", "p3", 0.0, 2)  # never refused: the oldest (p1) makes room
    assert 2 == partners.entries
    assert partners.add("alice", "p4", 2) is None
    assert 0.0 == partners.add("alice", "p3", 2)


def test_an_entry_costs_what_the_docs_say() -> None:
    """``memory_partners`` says about 120 bytes an entry with 16-character ids (the partner
    ids come from parsed JSON, one string each, as in a server)."""
    clock = Clock()
    partners = DmPartners(clock)
    names = [json.loads(json.dumps(f"partner-{n:08d}")) for n in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n, name in enumerate(names):
            clock.now += 0.001  # a time of its own each, as in a server
            partners.add(f"user-{n // 200:08d}", name, 200)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    per_entry = (used + sum(len(name) + 49 for name in names)) / 20_000
    assert per_entry < 150, per_entry
