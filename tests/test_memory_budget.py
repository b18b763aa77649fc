"""History held in memory has a total budget (PROTOCOL.md section 16): the accounting
matches what Python really holds, and past the budget the conversation written to least
recently goes first, whole."""

from __future__ import annotations

import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from aleatoria.codec import encode, now
from aleatoria.messages import Envelope
from aleatoria.safety import AUTO_SHADOW_WINDOW
from aleatoria.store.memory import CONVERSATION_OVERHEAD, ENTRY_OVERHEAD, MemoryStore


def _message(n: int, size: int = 50) -> tuple[bytes, int]:
    created_ns, created = now()
    data = encode(
        Envelope(
            type="chat_message",
            from_user="u",
            room="r",
            payload={"content": "x" * size},
            message_id=f"m{n}",
            create_time=created,
        )
    )
    return data, created_ns


def _store(budget: int | None = None, history_max: int = 1000) -> MemoryStore:
    return MemoryStore(ttl_seconds=3600, history_max=history_max, budget_bytes=budget)


def test_accounting_matches_what_is_really_held() -> None:
    """Within 15 %, both for many messages in few rooms and one message in many rooms."""
    for conversations in (20, 5000):
        store = _store()
        messages = [_message(n) for n in range(10_000)]
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for n, (data, created_ns) in enumerate(messages):
                if n % 2:
                    store.record_room_message(f"r{n % conversations}", data, created_ns)
                else:
                    store.record_direct_message("a", f"b{n % conversations}", data, created_ns)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        held += sum(len(data) + 33 for data, _ in messages)  # the messages were made before
        assert 0.85 < store.history_bytes / held < 1.15, (conversations, store.history_bytes, held)


def test_the_least_recently_written_conversation_goes_first() -> None:
    data, created_ns = _message(0)
    one_room = _store().history_bytes
    probe = _store()
    probe.record_room_message("probe", data, created_ns)
    per_conversation = probe.history_bytes - one_room
    store = _store(budget=3 * per_conversation)
    store.record_room_message("old", data, created_ns)
    store.record_direct_message("a", "b", data, created_ns)
    store.record_room_message("new", data, created_ns)
    store.record_room_message("old", data, created_ns)  # "old" is now the most recent
    assert store.history_bytes <= 3 * per_conversation
    assert [] == store.direct_messages_now("a", "b", 10)  # the DM was the least recent
    assert 1 == len(store.recent_room_messages_now("new", 10))
    assert 2 == len(store.recent_room_messages_now("old", 10))
    assert 1 == store.evicted_conversations


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 30), st.integers(0, 400)),
        max_size=300,
    ),
    st.integers(2_000, 40_000),
    st.integers(1, 8),
)
def test_never_over_budget_and_the_count_stays_exact(
    writes: list[tuple[bool, int, int]], budget: int, history_max: int
) -> None:
    """Whatever is written (rooms and DMs, any sizes, caps that drop old entries), the
    bytes held never pass the budget and equal the sum over what is kept."""
    store = _store(budget, history_max)
    for n, (room, target, size) in enumerate(writes):
        data, created_ns = _message(n, size)
        if room:
            store.record_room_message(f"r{target}", data, created_ns)
        else:
            store.record_direct_message("a", f"b{target}", data, created_ns)
        assert store.history_bytes <= budget
    expected = sum(
        CONVERSATION_OVERHEAD + sum(len(m) + ENTRY_OVERHEAD for _, m in history)
        for table in (store._rooms, store._dms)
        for history in table.values()
    )
    assert expected == store.history_bytes
    store.purge_expired()
    assert expected == store.history_bytes


async def test_reporters_of_users_no_longer_reported_are_forgotten_by_the_purge() -> None:
    """Who reported whom is kept for the auto-shadow window; the minute's purge drops what
    is older, so reports of ever new user ids do not pile up."""
    clock = [1_800_000_000 * 10**9]
    store = MemoryStore(ttl_seconds=3600, history_max=100, clock_ns=lambda: clock[0])
    safety = store.safety
    start = clock[0] / 1e9
    for n in range(1000):
        await safety.add_report({"reporter": "mallory", "reported": f"u{n}"}, start)
    await safety.add_report({"reporter": "alice", "reported": "bob"}, start + AUTO_SHADOW_WINDOW - 1)
    clock[0] += int(AUTO_SHADOW_WINDOW * 10**9)
    store.purge_expired()
    assert {"bob": {"alice": start + AUTO_SHADOW_WINDOW - 1}} == store.safety._reporters
