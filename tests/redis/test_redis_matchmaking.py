"""Matchmaking in Redis: the rules of ``aleatoria.matchmaking``, atomically, across instances."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio
from redis_server import RedisServer
from redis_support import server_config
from support import SocketPeer, connect, running_server

from aleatoria.matchmaking import (
    IMPOLITE,
    POLITE,
    RECENT_MATCH_SECONDS,
    RECENT_MATCHES,
    Matchmaker,
    RequestOutcome,
)
from aleatoria.search import Profile
from aleatoria.store.redis import RedisStore, open_redis_store

MATCHES = "webrtc:matches:{available:webrtc}"
MATCH_IDS = "webrtc:match-ids:{available:webrtc}"
MATCH_COMMON = "webrtc:match-common:{available:webrtc}"
ENDED = "aleatoria:ended-matches:{available:webrtc}:"


@asynccontextmanager
async def store_on(server: RedisServer) -> AsyncIterator[RedisStore]:
    async with open_redis_store(server_config(server.url), server.url) as store:
        assert "ok" == store.health()
        yield store


def _check_no_double_assignment(pairs: list[tuple[str, str]], r_matches: dict[bytes, bytes]) -> None:
    partner: dict[str, str] = {}
    for a, b in pairs:
        for user, other in ((a, b), (b, a)):
            assert partner.setdefault(user, other) == other, f"{user} assigned twice"
    stored = {k.decode(): v.decode().split("|")[0] for k, v in r_matches.items()}
    assert partner == stored


async def test_200_concurrent_requesters_on_two_instances(redis_server: RedisServer) -> None:
    """200 pooled users request a peer at once through two store instances sharing one
    Redis: no user is ever assigned to two peers, and Redis' matches agree."""
    users = [f"u{i}" for i in range(200)]
    async with store_on(redis_server) as one, store_on(redis_server) as two:
        stores = (one, two)
        for i, user in enumerate(users):
            await stores[i % 2].set_available(user)
        outcomes: dict[str, RequestOutcome] = {}

        async def request(i: int, user: str) -> None:
            outcomes[user] = await stores[i % 2].request_peer(user, None)

        async with trio.open_nursery() as nursery:
            for i, user in enumerate(users):
                nursery.start_soon(request, i, user)
        pairs = []
        for user, outcome in outcomes.items():
            if outcome.peer is not None:
                pairs.append((user, outcome.peer) if outcome.role == IMPOLITE else (outcome.peer, user))
        with redis_server.client() as r:
            _check_no_double_assignment(sorted(set(pairs)), r.hgetall(MATCHES))
            matched = {u for pair in pairs for u in pair}
            assert len(matched) >= 198
            assert set() == {m.decode() for m in r.smembers("available:webrtc")} & matched


async def test_200_concurrent_requesters_over_websockets(redis_server: RedisServer) -> None:
    """Through real WebSocket clients: every ``assign_role`` a user receives names the same
    peer, and that peer's names the user."""
    count = 200
    async with running_server(server_config(redis_server.url)) as srv:
        peers: dict[str, set[str]] = {f"w{i}": set() for i in range(count)}
        clients: dict[str, SocketPeer] = {}
        ready = trio.Event()
        requested = trio.Event()
        done = trio.Event()
        finished = 0

        async def user_task(user: str, *, task_status: trio.TaskStatus[None]) -> None:
            nonlocal finished
            async with connect(srv, user, skip=True) as client:
                clients[user] = client
                await client.send({"type": "user_available_webrtc"})
                await client.request({"type": "ping"}, "pong", skip=True)
                task_status.started()
                await ready.wait()
                await client.send({"type": "request_random_peer"})
                await client.send({"type": "ping"})
                await _collect(client, peers[user])
                finished += 1
                if finished == count:
                    requested.set()
                # Second round: everything the others' requests sent is in before this pong.
                await requested.wait()
                await client.send({"type": "ping"})
                await _collect(client, peers[user])
                finished += 1
                if finished == 2 * count:
                    done.set()
                await done.wait()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for user in peers:
                    await nursery.start(user_task, user)
                ready.set()
        pairs = {tuple(sorted((user, peer))) for user, seen in peers.items() for peer in seen}
        for user, seen in peers.items():
            assert len(seen) <= 1, f"{user} was assigned {seen}"
            for peer in seen:
                assert {user} == peers[peer]
        with redis_server.client() as r:
            assert len(pairs) >= count // 2 - 1
            assert set() == r.smembers("available:webrtc") & {u.encode() for p in pairs for u in p}


async def _collect(client: SocketPeer, seen: set[str]) -> None:
    while True:
        message = await client.recv()
        if message["type"] == "assign_role":
            seen.add(message["payload"]["peerId"])
        elif message["type"] == "pong":
            return


async def test_same_outcomes_as_the_in_memory_matchmaker(redis_server: RedisServer) -> None:
    """Every rule (no peer, match, resend, "next" with currentPeerId, re-declared
    availability, hangup, disconnect) gives what ``Matchmaker`` gives, when the pick is forced
    (one candidate)."""
    memory = Matchmaker()
    ids: dict[str, str] = {}
    async with store_on(redis_server) as store:

        async def both(command: str, *args: str | None) -> None:
            expected = getattr(memory, "disconnect" if command == "user_gone" else command)(*args)
            actual = await getattr(store, command)(*args)
            if isinstance(expected, RequestOutcome):
                # Match ids are random: each store's own, the same on a resend.
                assert bool(expected.match_id) == bool(actual.match_id), (command, args)
                if actual.match_id:
                    ids[actual.peer] = ids[args[0] or ""] = actual.match_id
                if expected.resend:
                    assert ids.get(args[0] or "") == actual.match_id, "a resend carries the match's id"
                expected, actual = attrs.evolve(expected, match_id=""), attrs.evolve(actual, match_id="")
            assert expected == actual, (command, args)

        await both("request_peer", "a", None)  # nobody pooled
        await both("set_available", "b")
        await both("request_peer", "b", None)  # only itself pooled
        await both("request_peer", "a", None)  # a-b
        await both("request_peer", "a", None)  # resend, impolite
        await both("request_peer", "b", None)  # resend, polite
        await both("set_available", "c")
        await both("request_peer", "a", "b")  # next: ends a-b, matches c
        await both("hangup", "b", "a")  # not their match any more
        await both("set_available", "b")
        await both("set_available", "c")  # ends a-c, c pooled again
        await both("request_peer", "a", "c")  # next with c excluded: b
        await both("user_gone", "b")  # ends a-b
        await both("set_unavailable", "c")
        await both("request_peer", "a", None)
        await both("hangup", "a", "nobody")
        with redis_server.client() as r:
            assert set(memory.pool()) == {m.decode() for m in r.smembers("available:webrtc")}


async def test_common_interests_are_kept_with_the_match(redis_server: RedisServer) -> None:
    """A match made on common interests keeps them beside its id: a resend, to either side
    and by either path (immediate or the search queue), carries both; they are removed with
    the match."""
    async with store_on(redis_server) as store:
        await store.set_available("b", Profile(interests=("chess", "go")))
        made = await store.request_peer("a", None, Profile(interests=("go", "chess", "golf")))
        assert ("b", ("go", "chess")) == (made.peer, made.common)
        again = await store.request_peer("b", None)
        assert (True, made.match_id, ("go", "chess")) == (again.resend, again.match_id, again.common)
        searched = await store.search("a", None, Profile(interests=("golf",)))
        assert searched.resend is not None
        assert ("b", made.match_id, ("go", "chess")) == (
            searched.resend.peer,
            searched.resend.match_id,
            searched.resend.common,
        )
        with redis_server.client() as r:
            assert {b"a", b"b"} == set(r.hkeys(MATCH_COMMON))
            assert await store.hangup("b", "a")
            assert 0 == r.exists(MATCH_COMMON, MATCH_IDS)
        # A match on no common interest keeps none (and a resend carries none).
        await store.set_available("b")
        made = await store.request_peer("a", None)
        assert ("b", ()) == (made.peer, made.common)
        assert () == (await store.request_peer("a", None)).common
        with redis_server.client() as r:
            assert 0 == r.exists(MATCH_COMMON)


async def test_ended_matches_are_remembered_for_reports(redis_server: RedisServer) -> None:
    """As the Matchmaker does: ``match_between`` gives the live match's id, else the most
    recent of a user's last RECENT_MATCHES ended matches with that user that ended within
    RECENT_MATCH_SECONDS, else None. Redis keeps each record newest first, expiring that long
    after the last match in it ended."""
    async with store_on(redis_server) as store:
        ids: dict[str, str] = {}
        peers = [f"p{i}" for i in range(RECENT_MATCHES + 2)]
        for peer in peers:
            await store.set_available(peer)
            ids[peer] = (await store.request_peer("a", None)).match_id
            assert ids[peer] == await store.match_between("a", peer) == await store.match_between(peer, "a")
            assert None is await store.match_between("a", "nobody")
            assert await store.hangup(peer, "a")
        forgotten, kept = peers[:2], peers[2:]
        assert [None, None] == [await store.match_between("a", peer) for peer in forgotten]
        assert [ids[peer] for peer in kept] == [await store.match_between("a", peer) for peer in kept]
        assert ids["p0"] == await store.match_between("p0", "a")  # p0's own record
        # The same two again: the most recent match; ended by "next", by pooling.
        await store.set_available("p9")
        again = (await store.request_peer("a", "p8")).match_id
        assert again != ids["p9"]
        assert "p9" == await store.set_available("a")
        assert again == await store.match_between("p9", "a") == await store.match_between("a", "p9")
        with redis_server.client() as r:
            key = ENDED + "a"
            assert RECENT_MATCHES == r.llen(key)
            assert b"p9|" == r.lindex(key, 0)[:3]
            assert 0 < r.pttl(key) <= RECENT_MATCH_SECONDS * 1000
            # A match that ended longer ago than that is not reported.
            old_ms = int((time.time() - RECENT_MATCH_SECONDS - 5) * 1000)
            r.rpush(key, f"gone|{old_ms}|m-old")
        assert None is await store.match_between("a", "gone")


async def test_pick_is_uniform(redis_server: RedisServer) -> None:
    """Over many requests every pooled candidate is picked about equally often."""
    candidates = [f"c{i}" for i in range(5)]
    picks: Counter[str] = Counter()
    async with store_on(redis_server) as store:
        for user in candidates:
            await store.set_available(user)
        for _ in range(500):
            outcome = await store.request_peer("req", None)
            assert outcome.peer is not None
            picks[outcome.peer] += 1
            assert POLITE != outcome.role
            await store.hangup("req", outcome.peer)
            await store.set_available(outcome.peer)
    assert set(candidates) == set(picks)
    assert all(55 <= n <= 145 for n in picks.values()), picks
