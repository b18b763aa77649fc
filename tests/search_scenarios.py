"""The rules of PROTOCOL.md section 12 as scenarios, run against the in-memory tier
(``test_search_protocol.py``, trio's mock clock) and a real server on Redis
(``redis/test_redis_search.py``, real clock): the same test for both stores.

Each scenario takes ``opened(user)`` (an async context manager giving a connected peer with
the ``support.Peer`` API) and the server's ``Config`` (its timings)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio
from support import Peer

from aleatoria.config import Config

Opener = Callable[[str], AbstractAsyncContextManager[Peer]]


def search(**payload: Any) -> dict[str, Any]:
    return {"type": "request_random_peer", "payload": {"wait": True, **payload}}


async def sync(peer: Peer) -> None:
    await peer.request({"type": "ping"}, "pong")


async def matched_pair(a: Peer, b: Peer, timeout: float = 10.0) -> tuple[Any, Any]:
    """Both sides' assign_role payloads; they must name each other and share one matchId."""
    mine = (await a.expect("assign_role", timeout))["payload"]
    theirs = (await b.expect("assign_role", timeout))["payload"]
    assert (mine["peerId"], theirs["peerId"]) == (b.user, a.user)
    assert {mine["role"], theirs["role"]} == {"impolite", "polite"}
    assert mine["matchId"] == theirs["matchId"] and mine["matchId"]
    assert mine["commonInterests"] == theirs["commonInterests"]
    return mine, theirs


async def common_interest_match(opened: Opener, config: Config) -> None:
    """``searching`` answers at once with the normalised profile and the place; a later
    searcher sharing an interest is matched with the older one (impolite), matchId and
    commonInterests on both sides."""
    async with opened("alice") as alice, opened("bob") as bob:
        reply = await alice.request(search(interests=[" Music", "FILMS"], language="EN"), "searching")
        payload = reply["payload"]
        assert (["music", "films"], "en", 1) == (
            payload["interests"],
            payload["language"],
            payload["position"],
        )
        assert payload["online"] >= 2
        reply = await bob.request(search(interests=["films", "chess"]), "searching")
        assert ["films", "chess"] == reply["payload"]["interests"] and "language" not in reply["payload"]
        mine, _ = await matched_pair(alice, bob)
        assert ("impolite", ["films"]) == (mine["role"], mine["commonInterests"])


async def interest_wait_then_anyone(opened: Opener, config: Config) -> None:
    """Searchers without a common interest are matched only after ALEATORIA_INTEREST_WAIT,
    with commonInterests empty (the fallback)."""
    async with opened("alice") as alice, opened("bob") as bob:
        started = trio.current_time()
        await alice.request(search(interests=["chess"]), "searching")
        await bob.request(search(interests=["golf"]), "searching")
        mine, _ = await matched_pair(alice, bob, timeout=config.interest_wait + 10)
        assert trio.current_time() - started >= config.interest_wait
        assert [] == mine["commonInterests"]


async def interests_only_times_out(opened: Opener, config: Config) -> None:
    """``interestsOnly`` never falls back; after ALEATORIA_SEARCH_TIMEOUT both searchers get
    no_peer_available."""
    async with opened("alice") as alice, opened("bob") as bob:
        started = trio.current_time()
        await alice.request(search(interests=["chess"], interestsOnly=True), "searching")
        await bob.request(search(), "searching")
        assert "no_peer_available" == (await alice.recv(config.search_timeout + 10))["type"]
        assert "no_peer_available" == (await bob.recv(config.search_timeout + 10))["type"]
        assert trio.current_time() - started >= config.search_timeout


async def language_is_a_hard_filter_and_oldest_goes_first(opened: Opener, config: Config) -> None:
    """Different languages never match; a newcomer without a language goes to the oldest
    compatible searcher."""
    async with opened("alice") as alice, opened("bob") as bob, opened("carol") as carol:
        await alice.request(search(language="en"), "searching")
        await bob.request(search(language="fr"), "searching")
        await sync(alice)
        await carol.request(search(), "searching")
        await matched_pair(alice, carol)
        await bob.send({"type": "cancel_search"})
        await sync(bob)  # no reply to cancel_search; nothing else arrived either


async def cooldown_keeps_partners_apart(opened: Opener, config: Config) -> None:
    """Two former partners searching again are not matched with each other; a third user
    is matched at once."""
    async with opened("alice") as alice, opened("bob") as bob:
        await alice.request(search(), "searching")
        await bob.request(search(), "searching")
        mine, _ = await matched_pair(alice, bob)
        reply = await alice.request(search(currentPeerId="bob"), "searching")
        assert 1 == reply["payload"]["position"]
        assert "peer_left" == (await bob.expect("hangup"))["payload"]["reason"]
        await bob.request(search(), "searching")
        async with opened("carol") as carol:
            await carol.request(search(), "searching")
            again, _ = await matched_pair(alice, carol)
            assert again["matchId"] != mine["matchId"]


async def cancel_and_resend(opened: Opener, config: Config) -> None:
    """cancel_search leaves the queue (no reply); a request from a user in a match re-sends
    its assign_role with the same matchId, and no ``searching``."""
    async with opened("alice") as alice, opened("bob") as bob, opened("carol") as carol:
        await alice.request(search(), "searching")
        await alice.send({"type": "cancel_search"})
        await sync(alice)
        assert 1 == (await bob.request(search(), "searching"))["payload"]["position"]
        stats = (await carol.request({"type": "get_stats"}, "stats"))["payload"]
        assert 1 == stats["searching"], "get_stats counts the queue"
        await carol.request(search(), "searching")
        mine, _ = await matched_pair(bob, carol)
        resent = await bob.request(search(), "assign_role")
        assert mine == resent["payload"]


async def resends_carry_the_common_interests(opened: Opener, config: Config) -> None:
    """A user in a live match made on common interests who asks again, with or without
    ``wait``, hears its own ``assign_role`` again: the same matchId and commonInterests
    (PROTOCOL.md sections 4 and 12), whether the queue or the immediate pick made the match."""
    async with opened("alice") as alice, opened("bob") as bob:
        await alice.request(search(interests=["films", "chess"]), "searching")
        await bob.request(search(interests=["chess", "films", "golf"]), "searching")
        mine, theirs = await matched_pair(alice, bob)
        assert ["films", "chess"] == mine["commonInterests"]
        assert mine == (await alice.request(search(), "assign_role"))["payload"]
        assert mine == (await alice.request({"type": "request_random_peer"}, "assign_role"))["payload"]
        assert theirs == (await bob.request(search(interests=["golf"]), "assign_role"))["payload"]
        assert theirs == (await bob.request({"type": "request_random_peer"}, "assign_role"))["payload"]
    async with opened("carol") as carol, opened("dave") as dave:
        await dave.send({"type": "user_available_webrtc", "payload": {"interests": ["tennis"]}})
        await sync(dave)
        immediate = {"type": "request_random_peer", "payload": {"interests": ["Tennis", "go"]}}
        assigned = (await carol.request(immediate, "assign_role"))["payload"]
        told = (await dave.expect("assign_role"))["payload"]
        assert ["tennis"] == assigned["commonInterests"] == told["commonInterests"]
        assert assigned == (await carol.request(search(), "assign_role"))["payload"]
        assert assigned == (await carol.request(immediate, "assign_role"))["payload"]
        assert told == (await dave.request({"type": "request_random_peer"}, "assign_role"))["payload"]
        assert told == (await dave.request(search(interests=["go"]), "assign_role"))["payload"]


async def pooled_users_and_the_immediate_path(opened: Opener, config: Config) -> None:
    """A searcher takes a pooled user sharing its interest; the immediate path prefers the
    pooled user sharing the most interests and keeps to the language."""
    async with opened("alice") as alice, opened("bob") as bob, opened("carol") as carol:
        await bob.send({"type": "user_available_webrtc", "payload": {"interests": ["golf"]}})
        await carol.send({"type": "user_available_webrtc", "payload": {"interests": ["chess", "go"]}})
        await sync(carol)
        await alice.request(search(interests=["Chess"]), "searching")
        mine, _ = await matched_pair(alice, carol)
        assert ["chess"] == mine["commonInterests"]
        async with opened("dave") as dave, opened("erin") as erin, opened("fred") as fred:
            await dave.send({"type": "user_available_webrtc", "payload": {"language": "fr"}})
            await erin.send({"type": "user_available_webrtc", "payload": {"interests": ["tennis", "golf"]}})
            await sync(erin)
            assigned = await fred.request(
                {"type": "request_random_peer", "payload": {"interests": ["golf", "tennis"]}}, "assign_role"
            )
            assert ("erin", ["golf", "tennis"]) == (
                assigned["payload"]["peerId"],
                assigned["payload"]["commonInterests"],
            )
            await erin.expect("assign_role")
            # Only dave (fr) and bob (golf) are pooled: a Spanish speaker gets bob.
            async with opened("gina") as gina:
                assigned = await gina.request(
                    {"type": "request_random_peer", "payload": {"language": "es"}}, "assign_role"
                )
                assert "bob" == assigned["payload"]["peerId"]
                await bob.expect("assign_role")


async def bad_profiles_are_refused(opened: Opener, config: Config) -> None:
    """Bad values are invalid_payload; too many or too long interests too_large."""
    cases = [
        ({"interests": "chess"}, "invalid_payload"),
        ({"interests": [1]}, "invalid_payload"),
        ({"interests": ["  "]}, "invalid_payload"),
        ({"interests": [f"t{i}" for i in range(11)]}, "too_large"),
        ({"interests": ["x" * 33]}, "too_large"),
        ({"language": "english"}, "invalid_payload"),
        ({"language": "xx"}, "invalid_payload"),
        ({"interestsOnly": "yes"}, "invalid_payload"),
        ({"wait": 1}, "invalid_payload"),
    ]
    async with opened("alice") as alice:
        for payload, code in cases:
            await alice.send({"type": "request_random_peer", "payload": payload})
            assert code == (await alice.expect("error"))["payload"]["code"], payload
        await alice.send({"type": "user_available_webrtc", "payload": {"language": 7}})
        assert "invalid_payload" == (await alice.expect("error"))["payload"]["code"]


async def blocked_users_never_meet(opened: Opener, config: Config) -> None:
    """A block keeps two searchers apart (both time out)."""
    async with opened("alice") as alice, opened("bob") as bob:
        await alice.request({"type": "block_user", "payload": {"user": "bob"}}, "user_blocked")
        await alice.request(search(), "searching")
        await bob.request(search(), "searching")
        assert "no_peer_available" == (await alice.recv(config.search_timeout + 10))["type"]
        assert "no_peer_available" == (await bob.recv(config.search_timeout + 10))["type"]


async def unblocking_lets_them_meet(opened: Opener, config: Config) -> None:
    """A block kept two compatible searchers apart (and a searcher from a pooled user);
    once it is removed they are matched without waiting for anything else: no interest
    wait, no timeout, no other user's arrival."""
    async with opened("alice") as alice, opened("bob") as bob:
        await alice.request({"type": "block_user", "payload": {"user": "bob"}}, "user_blocked")
        started = trio.current_time()
        await alice.request(search(), "searching")
        await bob.request(search(), "searching")
        await sync(alice)
        await sync(bob)  # both queued, apart: nothing else arrived (sync's pong came next)
        await alice.request({"type": "unblock_user", "payload": {"user": "bob"}}, "user_unblocked")
        await matched_pair(alice, bob, timeout=config.search_timeout / 2)
        assert trio.current_time() - started < config.search_timeout
    async with opened("dave") as dave, opened("erin") as erin:
        await erin.request({"type": "block_user", "payload": {"user": "dave"}}, "user_blocked")
        await dave.send({"type": "user_available_webrtc"})
        await sync(dave)
        await erin.request(search(), "searching")
        await sync(erin)
        await erin.request({"type": "unblock_user", "payload": {"user": "dave"}}, "user_unblocked")
        await matched_pair(erin, dave, timeout=config.search_timeout / 2)


SCENARIOS = [
    common_interest_match,
    interest_wait_then_anyone,
    interests_only_times_out,
    language_is_a_hard_filter_and_oldest_goes_first,
    cooldown_keeps_partners_apart,
    cancel_and_resend,
    resends_carry_the_common_interests,
    pooled_users_and_the_immediate_path,
    bad_profiles_are_refused,
    blocked_users_never_meet,
    unblocking_lets_them_meet,
]
