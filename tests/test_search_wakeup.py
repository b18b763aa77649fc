"""A known defect of the memory store's search task (PROTOCOL.md section 12), pinned.

``search_scenarios`` pass in memory only because ``inmemory_server`` starts the search task
with ``start_soon``: its first look at the queue comes after the scenario's searchers have
joined. A real server starts the task at boot, when nobody searches, so it sleeps without a
deadline (``search_delay()`` is None); a searcher who joins and is not matched at once does not
wake it (``Search.search`` calls ``on_events`` only when it made a match), so that searcher's
interest wait (the fallback) and search timeout are never acted on -- until some other match
or timeout happens to wake the task. On the demo page, in memory mode: "Searching…" forever
for someone whose interests nobody shares. Redis mode is not affected (its tick runs every
``search_tick``). Strict xfail: the day the task is woken, this fails and the mark goes.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from inmemory import connect, inmemory_server

DEFECT = "memory store: a new searcher never wakes the idle search task"


def search(**payload: object) -> dict[str, object]:
    return {"type": "request_random_peer", "payload": {"wait": True, **payload}}


@pytest.mark.xfail(strict=True, reason=DEFECT)
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


@pytest.mark.xfail(strict=True, reason=DEFECT)
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
