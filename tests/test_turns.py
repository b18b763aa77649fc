"""A user's turn (server._Turn): connection set-up and clean-up of one user never interleave,
waiters are served first come first served, and a waiter cancelled while it waits (or just as
it is handed the turn) never strands the turn."""

from __future__ import annotations

import trio
import trio.testing

from aleatoria.server import _Turn


async def test_turns_are_exclusive_and_first_come_first_served() -> None:
    table: dict[str, _Turn] = {}
    order: list[int] = []
    inside = 0

    async def take(n: int) -> None:
        nonlocal inside
        turn = table.setdefault("u", _Turn("u", table))
        async with turn:
            inside += 1
            assert inside == 1
            order.append(n)
            await trio.sleep(0.01)  # holds the turn while the later ones queue (work, not a wait)
            inside -= 1

    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(take, n)
            await trio.testing.wait_all_tasks_blocked()
    assert order == [0, 1, 2, 3, 4]
    assert table == {}  # the last one out forgets the turn


async def test_a_cancelled_waiter_does_not_strand_the_turn() -> None:
    """The waiter is cancelled, then (with no checkpoint in between, so the order is fixed)
    the holder leaves and hands the turn to it: it must pass the turn on, not keep it."""
    table: dict[str, _Turn] = {}
    turn = table["u"] = _Turn("u", table)
    got: list[str] = []
    cancel_me = trio.CancelScope()
    release = trio.Event()

    async def hold() -> None:
        async with turn:
            got.append("first")
            await release.wait()
            cancel_me.cancel()

    async def take(name: str) -> None:
        async with turn:
            got.append(name)

    async def cancelled_waiter() -> None:
        with cancel_me:
            await take("cancelled")

    with trio.fail_after(5):  # a stranded turn hangs "second"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(cancelled_waiter)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(take, "second")
            await trio.testing.wait_all_tasks_blocked()
            release.set()
    assert got == ["first", "second"]
    assert table == {}


async def test_a_waiter_cancelled_before_its_turn_leaves_the_queue() -> None:
    table: dict[str, _Turn] = {}
    turn = table["u"] = _Turn("u", table)
    got: list[str] = []
    cancel_me = trio.CancelScope()
    release = trio.Event()

    async def hold() -> None:
        async with turn:
            await release.wait()

    async def take(name: str) -> None:
        async with turn:
            got.append(name)

    async def cancelled_waiter() -> None:
        with cancel_me:
            await take("cancelled")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(cancelled_waiter)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(take, "second")
            await trio.testing.wait_all_tasks_blocked()
            cancel_me.cancel()
            await trio.testing.wait_all_tasks_blocked()
            release.set()
    assert got == ["second"]
    assert table == {}
