"""The memory store's search task wakes for a new searcher (PROTOCOL.md section 12).

A real server starts the search task at boot, when nobody searches, so it sleeps without a
deadline (``search_delay()`` is None). A searcher who joins and is not matched at once must
wake it (``Search.search`` calls ``on_events``), or that searcher's interest wait (the
fallback) and search timeout are never acted on: on the demo page in memory mode,
"Searching…" forever for someone whose interests nobody shares. (Found by a browser test;
fixed; these tests failed before the fix.) Redis mode ticks every ``search_tick``.
"""

from __future__ import annotations

import trio
import trio.testing
from inmemory import connect, inmemory_server


def search(**payload: object) -> dict[str, object]:
    return {"type": "request_random_peer", "payload": {"wait": True, **payload}}


async def test_fallback_happens_when_the_search_task_was_idle(autojump_clock: trio.testing.MockClock) -> None:
    """The search task is idle (nobody searched yet); two searchers without a common
    interest are matched once the interest wait has passed."""
    async with inmemory_server() as server, connect(server, "alice") as alice, connect(server, "bob") as bob:
        await trio.testing.wait_all_tasks_blocked()  # the search task is asleep, as at boot
        config = server.server.config
        await alice.request(search(interests=["chess"]), "searching")
        await bob.request(search(interests=["golf"]), "searching")
        with trio.move_on_after(config.interest_wait + 10) as waited:
            assigned = await alice.expect("assign_role", config.interest_wait + 20)
        assert not waited.cancelled_caught, "no match after the interest wait"
        assert "bob" == assigned["payload"]["peerId"]


async def test_timeout_happens_when_the_search_task_was_idle(autojump_clock: trio.testing.MockClock) -> None:
    """The search task is idle; a lone searcher hears no_peer_available after the timeout."""
    async with inmemory_server() as server, connect(server, "alice") as alice:
        await trio.testing.wait_all_tasks_blocked()
        config = server.server.config
        await alice.request(search(), "searching")
        with trio.move_on_after(config.search_timeout + 10) as waited:
            answer = await alice.recv(config.search_timeout + 20)
        assert not waited.cancelled_caught, "no answer after the search timeout"
        assert "no_peer_available" == answer["type"]
