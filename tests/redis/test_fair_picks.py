"""Fair picks (PROTOCOL.md section 16) in Redis: the ``request_peer`` script's immediate random
pick is uniform over the suitable users (pooled, online, not the requester, not the current
peer, not in a live match), by the protocol's chi-squared test: 10,000 picks from a pool of
200 at the 1 % level.

The users are pooled through a real store (so they are online: presence on a live instance),
then the script is called directly, as ``RedisStore.request_peer`` calls it, with random
numbers from a seeded ``random.Random``: the script's pick is a function of those numbers and
of the pool's contents only, so every run makes the same picks and a 1 % test cannot flake
(see tests/test_fair_picks_memory.py for the statistics and why the seed is fixed). Each pick
is undone with the ``set_available`` script (the picked user is pooled again, which ends the
match), so the requester is never matched away.
"""

from __future__ import annotations

import random
from collections import Counter

import redis
import trio
from redis_server import RedisServer
from redis_support import wait_until
from test_fair_picks_memory import PICKS, POOL, SEED, chi_squared, critical_value
from test_redis_matchmaking import store_on

from aleatoria.store.redis import RedisStore
from aleatoria.store.redis_presence import INSTANCES_KEY, PRESENCE_KEY, instance_channel, instance_users_key
from aleatoria.store.redis_scripts import (
    MATCHES_KEY,
    POOL_INDEX_KEY,
    POOL_KEY,
    REQUEST_PEER,
    SET_AVAILABLE,
    SMALL_POOL,
)

PICK_KEYS = [POOL_KEY, MATCHES_KEY, PRESENCE_KEY, INSTANCES_KEY]
_REQUEST_PEER = redis.Redis().register_script(REQUEST_PEER)  # called with each test's client


async def _pool_online(store: RedisStore, r: redis.Redis, pool: list[str]) -> None:
    """Pool ``pool`` through ``store`` and wait until its instance counts as alive (its bus
    has subscribed to the instance channel: the script's liveness check)."""
    for user in pool:
        await store.set_available(user)
    channel = instance_channel(store.instance)
    await wait_until(lambda: 0 < r.pubsub_numsub(channel)[0][1])


def _request(r: redis.Redis, requester: str, current: str | None, rnd: float) -> tuple[str, str, str]:
    """The script, called as ``RedisStore.request_peer`` calls it: (outcome, peer, role)."""
    args: list[str | int] = [requester, current or "", repr(rnd), SMALL_POOL]
    kind, peer, role, _ended = (part.decode() for part in _REQUEST_PEER(PICK_KEYS, args, r)[:4])
    return kind, peer, role


def _picks(
    r: redis.Redis, instance: str, requester: str, current: str | None, seed: int, count: int = PICKS
) -> Counter[str]:
    repool = r.register_script(SET_AVAILABLE)
    user_keys = [POOL_KEY, MATCHES_KEY, PRESENCE_KEY, instance_users_key(instance)]
    rng = random.Random(seed)
    requester_pooled = bool(r.sismember(POOL_KEY, requester))
    picks: Counter[str] = Counter()
    for _ in range(count):
        kind, peer, role = _request(r, requester, current, rng.random())
        assert ("match", "impolite") == (kind, role), (kind, peer, role)
        picks[peer] += 1
        undo = r.pipeline(transaction=False)
        repool(keys=user_keys, args=[peer, instance], client=undo)
        if requester_pooled:
            repool(keys=user_keys, args=[requester, instance], client=undo)
        assert requester.encode() == undo.execute()[0]
    return picks


async def test_pick_is_uniform_over_a_pool_of_200(redis_server: RedisServer) -> None:
    pool = [f"user{i}" for i in range(POOL)]
    async with store_on(redis_server) as store:
        with redis_server.client() as r:
            await _pool_online(store, r, pool)
            picks = await trio.to_thread.run_sync(_picks, r, store.instance, "requester", None, SEED)
    statistic = chi_squared(picks, pool)
    assert set(picks) <= set(pool)
    assert statistic < critical_value(POOL - 1), (statistic, picks.most_common(3))


async def test_unsuitable_users_are_never_picked_and_the_rest_stay_uniform(redis_server: RedisServer) -> None:
    """Among 200 pooled users: the requester itself, its current peer, 10 in a live match
    (pooled anyway, as a damaged pool might hold them), 5 without presence and 5 whose
    presence names a dead instance. None of them is ever picked; the 178 others are picked
    uniformly."""
    pool = [f"user{i}" for i in range(POOL)]
    requester, current = pool[0], pool[1]
    in_match, no_presence, dead_instance = pool[2:12], pool[12:17], pool[17:22]
    suitable = pool[22:]
    async with store_on(redis_server) as store:
        with redis_server.client() as r:
            await _pool_online(store, r, pool)
            for user in in_match:
                r.hset(MATCHES_KEY, user, "someone|polite")
            r.hdel(PRESENCE_KEY, *no_presence)
            for user in dead_instance:
                r.hset(PRESENCE_KEY, user, "gone-instance|c1")
            picks = await trio.to_thread.run_sync(_picks, r, store.instance, requester, current, SEED)
    assert set(picks) <= set(suitable), set(picks) - set(suitable)
    statistic = chi_squared(picks, suitable)
    assert statistic < critical_value(len(suitable) - 1), (statistic, picks.most_common(3))


async def test_a_pool_of_mostly_unsuitable_users_stays_uniform(redis_server: RedisServer) -> None:
    """190 of 200 pooled users are offline: most picks read the whole index after
    ``SMALL_POOL`` single draws, and the 10 online users are still picked uniformly."""
    pool = [f"user{i}" for i in range(POOL)]
    suitable = pool[::20]
    async with store_on(redis_server) as store:
        with redis_server.client() as r:
            await _pool_online(store, r, pool)
            r.hdel(PRESENCE_KEY, *(set(pool) - set(suitable)))
            picks = await trio.to_thread.run_sync(_picks, r, store.instance, "requester", None, SEED, 2000)
    assert set(picks) == set(suitable)
    statistic = chi_squared(picks, suitable)
    assert statistic < critical_value(len(suitable) - 1), picks


async def test_the_index_follows_the_pool(redis_server: RedisServer) -> None:
    """A pool written without the index (by an older server, or by hand) is indexed on the next
    pick; users taken out of the pool by other means are never picked and leave the index;
    with nobody suitable the answer is none, however large the pool."""
    pool = [f"user{i}" for i in range(POOL)]
    async with store_on(redis_server) as store:
        with redis_server.client() as r:
            await _pool_online(store, r, pool[:1])
            r.sadd(POOL_KEY, *pool)
            r.hset(PRESENCE_KEY, mapping=dict.fromkeys(pool, f"{store.instance}|"))
            r.delete(POOL_INDEX_KEY)
            kind, first, _role = _request(r, "requester", None, 0.5)
            assert "match" == kind
            assert r.zcard(POOL_INDEX_KEY) == r.scard(POOL_KEY) == POOL - 1
            r.hdel(MATCHES_KEY, "requester", first)

            gone = [user for user in pool[:150] if user != first]
            for user in gone:
                await store.set_unavailable(user)
            rng = random.Random(SEED)
            picked = set()
            for _ in range(200):
                kind, peer, _role = _request(r, "requester", None, rng.random())
                assert "match" == kind
                picked.add(peer)
                r.hdel(MATCHES_KEY, "requester", peer)
                r.sadd(POOL_KEY, peer)
                r.zadd(POOL_INDEX_KEY, {peer: 0})
            assert picked <= set(pool[150:]) and len(picked) > 40
            assert r.zcard(POOL_INDEX_KEY) <= 2 * r.scard(POOL_KEY) + 32
            assert not {user.decode() for user in r.zrange(POOL_INDEX_KEY, 0, -1)} - set(pool[150:])

            r.hdel(PRESENCE_KEY, *pool)
            assert ("none", "", "") == _request(r, "requester", None, 0.25)
            assert {user.encode() for user in pool[150:] if user != first} == r.smembers(POOL_KEY)
            assert {} == r.hgetall(MATCHES_KEY)
