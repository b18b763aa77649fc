"""PROTOCOL.md section 12 on the in-memory tier: every scenario of ``search_scenarios`` with
the real store, hub, router, sessions and search task, on trio's mock clock (the interest
wait and the search timeout pass at once)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import pytest
from inmemory import connect, inmemory_server
from search_scenarios import SCENARIOS
from support import Peer
from trio.testing import MockClock

from aleatoria.config import Config


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_scenario(
    scenario: Callable[[Callable[[str], AbstractAsyncContextManager[Peer]], Config], Awaitable[None]],
    autojump_clock: MockClock,
) -> None:
    async with inmemory_server() as server:

        def opened(user: str) -> AbstractAsyncContextManager[Peer]:
            return connect(server, user)

        await scenario(opened, server.server.config)


async def test_plain_request_is_unchanged(autojump_clock: MockClock) -> None:
    """A level-1 client's plain request_random_peer gets no ``searching``: assign_role or
    no_peer_available at once, as before (with matchId and commonInterests on assign_role)."""
    async with inmemory_server() as server, connect(server, "alice") as alice, connect(server, "bob") as bob:
        await alice.request({"type": "request_random_peer"}, "no_peer_available")
        await bob.send({"type": "user_available_webrtc"})
        reply = await alice.request({"type": "request_random_peer"}, "assign_role")
        assert {"role", "peerId", "matchId", "commonInterests"} == set(reply["payload"])
        assert "assign_role" == (await bob.recv())["type"]


async def test_match_ended_before_its_announcement_is_announced_first(autojump_clock: MockClock) -> None:
    """A search match is announced by the search task, after the request that made it; a
    match that ends before that task runs (here: the pooled partner disconnects in the same
    moment) is announced first, so its survivor hears ``assign_role`` and then ``hangup``
    (as after an immediate match), never a ``hangup`` and then an ``assign_role`` naming a
    user who is gone."""
    async with inmemory_server() as server, connect(server, "alice") as alice, connect(server, "bob") as bob:
        await bob.send({"type": "user_available_webrtc"})
        await bob.sync()
        # Neither call lets the search task run: the match is made, then ended, unannounced.
        await alice.send({"type": "request_random_peer", "payload": {"wait": True}})
        await bob.disconnect()
        await alice.send({"type": "ping"})
        kinds = []
        while (message := await alice.recv())["type"] != "pong":
            kinds.append((message["type"], message["fromUser"], message["payload"].get("peerId")))
        assert [
            ("searching", "system", None),
            ("assign_role", "system", "bob"),
            ("hangup", "bob", None),
        ] == kinds
        assert 0 == (await server.server.store.stats()).in_calls
