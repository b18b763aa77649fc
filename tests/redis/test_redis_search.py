"""PROTOCOL.md section 12 on the Redis store: every scenario of ``search_scenarios`` against
a real server on a real redis-server (real clock, short timings), and the search's keys."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import pytest
from redis_server import RedisServer
from redis_support import server_config
from search_scenarios import SCENARIOS, matched_pair, search
from support import Peer, connect, running_server

from aleatoria.config import Config
from aleatoria.store.redis_scripts import DUE_KEY, QUEUE_KEY, RECENT_PREFIX

TIMINGS = {"interest_wait": 1.0, "search_timeout": 3.0, "search_tick": 0.05}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_scenario(
    scenario: Callable[[Callable[[str], AbstractAsyncContextManager[Peer]], Config], Awaitable[None]],
    redis_server: RedisServer,
) -> None:
    config = server_config(redis_server.url, **TIMINGS)
    async with running_server(config) as srv:

        def opened(user: str) -> AbstractAsyncContextManager[Peer]:
            return connect(srv, user)

        await scenario(opened, config)


async def test_a_wait_or_timeout_is_due_once_it_has_certainly_passed(redis_server: RedisServer) -> None:
    """A searcher is looked at again 1 ms after its interest wait or its timeout: Redis's
    clock is read to the millisecond, truncated, so at exactly ``since + timeout`` up to a
    millisecond may be missing, and a timeout must never be answered early (the flake this
    pins: a client that timed it from before its request saw no_peer_available 3 s minus a
    fraction of a millisecond later)."""
    config = server_config(redis_server.url, **TIMINGS)
    r = redis_server.client()
    async with (
        running_server(config) as srv,
        connect(srv, "alice") as alice,
        connect(srv, "bob") as bob,
    ):
        await alice.request(search(interests=["chess"]), "searching")
        await bob.request(search(interests=["golf"], interestsOnly=True), "searching")
        alice_since = r.zscore(QUEUE_KEY, "alice")
        bob_since = r.zscore(QUEUE_KEY, "bob")
        assert alice_since is not None and bob_since is not None
        # Alice may fall back to anyone after the interest wait; Bob never does.
        assert r.zscore(DUE_KEY, "alice") == alice_since + config.interest_wait * 1000 + 1
        assert r.zscore(DUE_KEY, "bob") == bob_since + config.search_timeout * 1000 + 1


async def test_no_interest_wait_falls_back_at_once(redis_server: RedisServer) -> None:
    """With ALEATORIA_INTEREST_WAIT=0 two searchers without a common interest match at once,
    not at the next tick (a wait of 0 has passed even within the same millisecond)."""
    config = server_config(redis_server.url, **{**TIMINGS, "interest_wait": 0.0, "search_tick": 10.0})
    async with (
        running_server(config) as srv,
        connect(srv, "alice") as alice,
        connect(srv, "bob") as bob,
    ):
        await alice.request(search(interests=["chess"]), "searching")
        await bob.request(search(interests=["golf"]), "searching")
        mine, _ = await matched_pair(alice, bob, timeout=5.0)
        assert [] == mine["commonInterests"]


async def test_a_cooldown_is_due_once_it_has_certainly_passed(redis_server: RedisServer) -> None:
    """Former partners searching again are looked at 1 ms after their cooldown, by the same
    rule as a wait or a timeout, and not matched with each other before."""
    config = server_config(redis_server.url, **{**TIMINGS, "rematch_cooldown": 1.0, "search_timeout": 30.0})
    r = redis_server.client()
    async with (
        running_server(config) as srv,
        connect(srv, "alice") as alice,
        connect(srv, "bob") as bob,
    ):
        await alice.request(search(), "searching")
        await bob.request(search(), "searching")
        first, _ = await matched_pair(alice, bob)
        await alice.request(search(currentPeerId="bob"), "searching")
        await bob.expect("hangup")
        ended = r.zscore(RECENT_PREFIX + "alice", "bob")
        assert ended is not None
        assert r.zscore(DUE_KEY, "alice") == ended + config.rematch_cooldown * 1000 + 1
        await bob.request(search(), "searching")
        again, _ = await matched_pair(alice, bob, timeout=10.0)  # once the cooldown is over
        assert again["matchId"] != first["matchId"]
        assert r.zscore(RECENT_PREFIX + "alice", "bob") is not None  # remembered again
