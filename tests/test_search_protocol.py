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
