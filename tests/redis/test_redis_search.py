"""PROTOCOL.md section 12 on the Redis store: every scenario of ``search_scenarios`` against
a real server on a real redis-server (real clock, short timings), and the search's keys."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack

import pytest
import redis
from redis_server import RedisServer
from redis_support import server_config, wait_until
from search_scenarios import SCENARIOS, matched_pair, search, sync
from support import Peer, connect, running_server

from aleatoria.config import Config
from aleatoria.store.redis_client import Scripts
from aleatoria.store.redis_presence import (
    INSTANCE_USERS_PREFIX,
    INSTANCES_KEY,
    PRESENCE_KEY,
    instance_users_key,
)
from aleatoria.store.redis_scripts import (
    DUE_KEY,
    MATCHES_KEY,
    POOL_INDEX_KEY,
    POOL_KEY,
    POOLED_KEY,
    PROFILES_KEY,
    QUEUE_BARE_KEY,
    QUEUE_KEY,
    QUEUE_ONLY_KEY,
    QUEUE_OPEN_KEY,
    QUEUE_TAG_PREFIX,
    RECENT_PREFIX,
    TAG_PREFIX,
)

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


def _traces(r: redis.Redis, user: str) -> set[str]:
    """The keys that hold something of ``user``'s pool place or profile."""
    found = set()
    if r.sismember(POOL_KEY, user):
        found.add(POOL_KEY)
    for key in (POOL_INDEX_KEY, POOLED_KEY, QUEUE_KEY):
        if r.zscore(key, user) is not None:
            found.add(key)
    if r.hexists(PROFILES_KEY, user):
        found.add(PROFILES_KEY)
    for tag in r.scan_iter(match=TAG_PREFIX + "*"):
        if r.sismember(tag, user):
            found.add(tag.decode())
    return found


def _pooled_keys(*interests: str) -> set[str]:
    return {POOL_KEY, POOL_INDEX_KEY, POOLED_KEY, PROFILES_KEY} | {TAG_PREFIX + t for t in interests}


POOLED = {"ann": ["chess", "go"], "ben": ["chess"], "cal": ["golf", "chess"], "dee": ["go"]}


async def test_a_pooled_user_who_disconnects_leaves_nothing_in_the_search_keys(
    redis_server: RedisServer,
) -> None:
    """Users pooled with interests and a language (``user_available_webrtc``) who close leave
    no entry in the pooled users by time, the profiles or the tag sets. Found by a red-team
    run: the disconnect only took them out of the pool, and the rest grew with every user
    who ever pooled and left (nothing else removes it while nobody searches with wait)."""
    config = server_config(redis_server.url, **TIMINGS)
    with redis_server.client() as r:
        async with running_server(config) as srv, connect(srv, "zoe") as zoe:
            await zoe.send(
                {"type": "user_available_webrtc", "payload": {"interests": ["chess"], "language": "en"}}
            )
            await zoe.sync()
            async with AsyncExitStack() as leavers:
                for user, interests in POOLED.items():
                    peer = await leavers.enter_async_context(connect(srv, user))
                    payload = {"interests": interests, "language": "en"}
                    await peer.send({"type": "user_available_webrtc", "payload": payload})
                    await peer.sync()
                for user, interests in POOLED.items():
                    assert _traces(r, user) == _pooled_keys(*interests)
            await wait_until(lambda: not any(r.hexists(PRESENCE_KEY, user) for user in POOLED))
            for user in POOLED:
                assert _traces(r, user) == set(), user
            assert _traces(r, "zoe") == _pooled_keys("chess")  # still pooled, whole


def test_reaping_a_dead_instance_leaves_nothing_of_its_pooled_users_in_the_search_keys(
    redis_server: RedisServer,
) -> None:
    """The reaper takes a dead instance's pooled users out of the pool as a disconnect does:
    pooled users by time, profiles and tag sets too. A queued searcher of that instance keeps
    its queue place and profile (the tick times it out; a stalled instance's searcher keeps
    its place), and a pooled user of a live instance keeps everything."""
    scripts = Scripts()
    search_ms = [3000, 1000, 0]
    now_ms = int(time.time() * 1000)
    with redis_server.client() as r:
        r.zadd(INSTANCES_KEY, {"dead": now_ms + 60_000, "alive": now_ms + 60_000})

        def pool(user: str, instance: str, interests: list[str], language: str) -> None:
            profile = json.dumps({"i": interests, "l": language})
            keys = [POOL_KEY, MATCHES_KEY, PRESENCE_KEY, INSTANCES_KEY, instance_users_key(instance)]
            scripts.available(keys, [*search_ms, f"m-{user}", user, instance, profile], r)

        for user, interests in POOLED.items():
            pool(user, "dead", interests, "en")
        pool("zoe", "alive", ["chess"], "en")
        # A searcher of the dead instance, whom nobody pooled suits (another language).
        r.hset(PRESENCE_KEY, "eve", "dead|c1")
        r.sadd(instance_users_key("dead"), "eve")
        profile = json.dumps({"i": ["chess"], "l": "fr"})
        keys = [POOL_KEY, MATCHES_KEY, PRESENCE_KEY, INSTANCES_KEY]
        scripts.search(keys, [*search_ms, "m-eve", "eve", "", profile], r)
        assert r.zscore(QUEUE_KEY, "eve") is not None and not r.hexists(MATCHES_KEY, "eve")
        for user, interests in POOLED.items():
            assert _traces(r, user) == _pooled_keys(*interests)

        r.zadd(INSTANCES_KEY, {"dead": 0})
        keys = [POOL_KEY, MATCHES_KEY, INSTANCES_KEY, PRESENCE_KEY]
        dead, gone, ended = scripts.reap(keys, ["a-reaper", INSTANCE_USERS_PREFIX, 16], r)
        assert (dead, sorted(gone), ended) == ([b"dead"], sorted(u.encode() for u in [*POOLED, "eve"]), [])
        for user in POOLED:
            assert _traces(r, user) == set(), user
        assert _traces(r, "eve") == {QUEUE_KEY, PROFILES_KEY}
        assert _traces(r, "zoe") == _pooled_keys("chess")


def _queue_keys(r: redis.Redis) -> set[str]:
    """The search queue and its indexes (``redis_search``, "Keys") that exist."""
    return {key.decode() for key in r.scan_iter(match="aleatoria:search:queue*")}


async def test_searchers_who_leave_leave_nothing_in_the_queue_or_its_indexes(
    redis_server: RedisServer,
) -> None:
    """Searchers of each kind (interestsOnly, interests, none) leave the queue every way
    there is -- cancel_search, a disconnect, user_available_webrtc, an immediate
    request_random_peer, a match, the search timeout -- and nothing of them is left in the
    queue, its indexes, the due times or the profiles."""
    config = server_config(redis_server.url, **TIMINGS)
    with redis_server.client() as r:
        async with (
            running_server(config) as srv,
            connect(srv, "ann") as ann,
            connect(srv, "ben") as ben,
            connect(srv, "cat") as cat,
            connect(srv, "dan") as dan,
            connect(srv, "eve") as eve,
            connect(srv, "fay") as fay,
        ):
            await ann.request(search(interests=["chess", "go"], interestsOnly=True), "searching")
            await ben.request(search(interests=["golf"], interestsOnly=True), "searching")
            await cat.request(search(interests=["tea"], language="fr"), "searching")
            await dan.request(search(language="de"), "searching")
            await eve.request(search(interests=["films"], interestsOnly=True), "searching")
            async with connect(srv, "gus") as gus:
                await gus.request(search(interests=["opera"], interestsOnly=True), "searching")
                tags = {QUEUE_TAG_PREFIX + tag for tag in ("chess", "go", "golf", "tea", "films", "opera")}
                kinds = {QUEUE_BARE_KEY, QUEUE_OPEN_KEY, QUEUE_ONLY_KEY}
                assert {QUEUE_KEY} | kinds | tags == _queue_keys(r)
            await ann.send({"type": "cancel_search"})
            await sync(ann)
            await ben.send({"type": "user_available_webrtc", "payload": {"language": "en"}})  # not dan's
            await sync(ben)
            assign = await cat.request({"type": "request_random_peer"}, "assign_role")  # takes ben
            assert "ben" == assign["payload"]["peerId"]
            await fay.request(search(interests=["films"]), "searching")
            await matched_pair(eve, fay)
            await dan.expect("no_peer_available", timeout=config.search_timeout + 10)
            await wait_until(lambda: not _queue_keys(r))  # gus's instance cancels its search
            assert 0 == r.zcard(DUE_KEY)
            assert 0 == r.hlen(PROFILES_KEY)


async def test_a_searcher_redis_lost_in_a_restart_is_answered(redis_server: RedisServer) -> None:
    """Redis restarts empty (kill -9) while two users search: once the instance has recovered,
    each hears ``no_peer_available`` (their queue places are gone: nobody would ever answer
    them otherwise) and may search again; a pooled user keeps its pool place."""
    config = server_config(redis_server.url, **{**TIMINGS, "search_timeout": 60.0})
    async with (
        running_server(config) as srv,
        connect(srv, "alice") as alice,
        connect(srv, "bob") as bob,
        connect(srv, "carol") as carol,
    ):
        await alice.request(search(interests=["chess"], interestsOnly=True), "searching")
        await bob.request(search(interests=["golf"], language="de"), "searching")
        await carol.send({"type": "user_available_webrtc", "payload": {"language": "fr"}})
        await sync(carol)
        redis_server.kill9()
        await redis_server.restart()
        await alice.expect("no_peer_available")
        await bob.expect("no_peer_available")
        await alice.request(search(interests=["chess"], interestsOnly=True), "searching")
        with redis_server.client() as r:
            await wait_until(lambda: r.sismember(POOL_KEY, "carol") == 1)
            assert r.zscore(QUEUE_KEY, "alice") is not None


async def test_a_pooled_users_profile_is_back_after_redis_restarted(redis_server: RedisServer) -> None:
    """Redis restarts empty: the recovery pools Carol again, and her language comes back with
    her, so a requester of another language is not matched with her."""
    config = server_config(redis_server.url, **TIMINGS)
    async with (
        running_server(config) as srv,
        connect(srv, "carol") as carol,
        connect(srv, "dave") as dave,
    ):
        await carol.send(
            {"type": "user_available_webrtc", "payload": {"language": "fr", "interests": ["jazz"]}}
        )
        await sync(carol)
        redis_server.kill9()
        await redis_server.restart()
        with redis_server.client() as r:
            await wait_until(lambda: r.hget(PROFILES_KEY, "carol") is not None)
            assert {b"carol"} == r.smembers(TAG_PREFIX + "jazz")
        await dave.request(
            {"type": "request_random_peer", "payload": {"language": "de"}}, "no_peer_available"
        )
        await dave.request({"type": "request_random_peer", "payload": {"language": "fr"}}, "assign_role")
