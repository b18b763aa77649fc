"""The Redis search queue makes exactly the matches the rules make (PROTOCOL.md section 12:
``search.on_change`` is the spec, ``redis_search`` runs it as Lua over the queue's indexes).

A seeded random walk on a real redis-server: a queue and a pool written straight into Redis
(searchers and pooled users of every kind, some waiting for longer than the interest wait,
some at the same millisecond, blocks, shadow bans, recent partners, users in a match or
offline), then searches, pools, ticks, cancels, immediate requests and hangups through the
scripts. Before each step that decides a match, the state is read back from Redis and
``search.on_change`` is asked what the step must do; the script must do the same. After each
step the indexes must hold exactly the queue; at the end, once everyone has left the queue,
nothing of them is left.

Redis' clock decides ``now`` inside the script: the rules are asked at the clock read just
before and just after the call, and a step is compared when both give the same answer (an
interest wait or a cooldown ending within that millisecond or two would make it ambiguous:
a few steps at most). The Lua rules count a wait as over 1 ms later than the memory rules
(``redis_search``: "passed"), so the rules are given ``interest_wait + 1`` ms and a world
whose cooldown is read the Lua way.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
import redis
from redis_server import RedisServer

from aleatoria.search import Candidate, Profile, SearchRules, on_change
from aleatoria.store.redis_client import Scripts
from aleatoria.store.redis_presence import INSTANCES_KEY, PRESENCE_KEY, instance_channel, instance_users_key
from aleatoria.store.redis_scripts import (
    BLOCKS_PREFIX,
    DUE_KEY,
    MATCHES_KEY,
    PICK_DRAWS,
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
    SHADOW_KEY,
    TAG_PREFIX,
)
from aleatoria.store.redis_search import TICK_BATCH

TIMEOUT_MS, COOLDOWN_MS = 600_000, 300_000
KEYS = [POOL_KEY, MATCHES_KEY, PRESENCE_KEY, INSTANCES_KEY]
# Names whose byte order differs from case-insensitive order, and a non-ASCII one.
USERS = [f"u{i:02d}" for i in range(20)] + ["Ann", "ann", "Bob", "zoë"]
TAGS = ["chess", "films", "golf", "music", "tea"]
STEPS = ["search"] * 4 + ["available"] * 2 + ["tick"] * 2 + ["cancel", "request"] + ["hangup"] * 3
FAR = 2**45  # a due time (ms) no tick reaches


def _text(value: object) -> str:
    assert isinstance(value, bytes)
    return value.decode()


def _scored(r: redis.Redis, key: str) -> list[tuple[str, float]]:
    """A sorted set's members and scores, in its order."""
    entries = cast(list[tuple[bytes, float]], r.zrange(key, 0, -1, withscores=True))
    return [(_text(member), float(score)) for member, score in entries]


def _hash(r: redis.Redis, key: str) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in cast(dict[bytes, bytes], r.hgetall(key)).items()}


def _members(r: redis.Redis, key: str) -> set[str]:
    return {_text(member) for member in cast(set[bytes], r.smembers(key))}


class Snapshot:
    """What the rules need of Redis' state, read at once (``search.World``)."""

    def __init__(self, r: redis.Redis) -> None:
        self.now = 0.0  # the moment the rules are asked about (``_expected``)
        profiles = {u: _profile(raw) for u, raw in _hash(r, PROFILES_KEY).items()}
        queued = _scored(r, QUEUE_KEY)
        self.queue = [Candidate(u, profiles.get(u, Profile()), since, True) for u, since in queued]
        in_queue = {u for u, _ in queued}
        pooled = dict(_scored(r, POOLED_KEY))
        self.pool = [
            Candidate(u, profiles.get(u, Profile()), pooled.get(u, 0.0), False)
            for u in sorted(_members(r, POOL_KEY))
            if u not in in_queue
        ]
        self.blocks = {u: _members(r, BLOCKS_PREFIX + u) for u in USERS}
        self.shadow = dict(_scored(r, SHADOW_KEY))
        self.matched = set(_hash(r, MATCHES_KEY))
        self.online = {u for u, where in _hash(r, PRESENCE_KEY).items() if where.startswith("live|")}
        self.partners = {u: dict(_scored(r, RECENT_PREFIX + u)) for u in USERS}

    def shadowed(self, u: str) -> bool:
        return u in self.shadow and self.shadow[u] * 1000 > self.now

    def barred(self, a: str, b: str) -> bool:
        return b in self.blocks[a] or a in self.blocks[b] or self.shadowed(a) != self.shadowed(b)

    def in_match(self, user: str) -> bool:
        # An offline user is as unmatchable as one in a match (compatible() asks both sides).
        return user in self.matched or user not in self.online

    def recent(self, a: str, b: str, now: float) -> bool:
        when = self.partners[a].get(b)
        return when is not None and when + COOLDOWN_MS >= now  # Lua's: not yet passed for certain


def _profile(raw: str) -> Profile:
    data = json.loads(raw)
    return Profile(tuple(data.get("i", ())), data.get("l"), data.get("o") == 1)


def _queue_order(c: Candidate) -> tuple[float, bytes]:
    return (c.since, c.user.encode())


def _expected(
    state: Snapshot, wait_ms: int, kind: str, user: str, profile: Profile, now: float
) -> tuple[str, str] | None:
    """The match the rules make for step ``kind`` by ``user`` in ``state`` if Redis' clock
    reads ``now``."""
    state.now = now
    rules = SearchRules(timeout=TIMEOUT_MS, interest_wait=wait_ms + 1 if wait_ms else 0, cooldown=COOLDOWN_MS)
    queue = [c for c in state.queue if c.user != user]
    pool = [c for c in state.pool if c.user != user]
    if kind == "tick":
        [x] = [c for c in state.queue if c.user == user]
        queue = state.queue
    else:
        x = Candidate(user, profile, now, kind == "search")
        if kind == "search":
            queue = sorted([*queue, x], key=_queue_order)
        elif not queue:
            return None  # AVAILABLE looks only when someone searches
    pair = on_change(queue, pool, x, now, rules, state)
    return None if pair is None else (pair[0].user, pair[1].user)


def _made(raw: Any) -> tuple[str, str] | None:
    if not isinstance(raw, list) or not raw:
        return None
    return _text(raw[0]), _text(raw[1])


def _clock(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return seconds * 1000 + micros // 1000


def _random_profile(rng: random.Random) -> Profile:
    tags = tuple(rng.sample(TAGS, rng.choice([0, 0, 1, 1, 2, 3])))
    return Profile(tags, rng.choice([None, None, None, "en", "fr"]), bool(tags) and rng.random() < 0.3)


def _dump(profile: Profile) -> str:
    return json.dumps(profile.to_json())


def _seed_state(r: redis.Redis, rng: random.Random, wait_ms: int) -> None:
    """A queue and a pool written straight into Redis (the indexes are the scripts' to build:
    the first step finds none and builds them from the queue). Times are kept well away from
    the ends of interest waits and cooldowns."""
    now = _clock(r)
    ages = [0, 0, 2, 500, 1500, 1500, 2 * wait_ms + 3000, 3 * wait_ms + 5000, 3 * wait_ms + 5000]
    pipe = r.pipeline(transaction=False)
    for user in USERS:
        role = rng.choice(["queued", "queued", "pooled", "away"])
        profile = _random_profile(rng)
        since = now - rng.choice(ages)
        if role == "queued":
            pipe.zadd(QUEUE_KEY, {user: since})
            pipe.zadd(DUE_KEY, {user: FAR})
            pipe.hset(PROFILES_KEY, user, _dump(profile))
        elif role == "pooled":
            pipe.sadd(POOL_KEY, user)
            pipe.zadd(POOL_INDEX_KEY, {user: 0})
            pipe.zadd(POOLED_KEY, {user: since})
            pipe.hset(PROFILES_KEY, user, _dump(profile))
            for tag in profile.interests:
                pipe.sadd(TAG_PREFIX + tag, user)
        presence = "dead|c" if rng.random() < 0.08 else "live|c"
        pipe.hset(PRESENCE_KEY, user, presence)
        pipe.sadd(instance_users_key(presence.split("|")[0]), user)
    for _ in range(12):
        a, b = rng.sample(USERS, 2)
        pipe.sadd(BLOCKS_PREFIX + a, b)
    for user in rng.sample(USERS, 2):
        pipe.zadd(SHADOW_KEY, {user: now // 1000 + 3600})
    for _ in range(8):
        a, b = rng.sample(USERS, 2)
        when = now - rng.choice([1000, 2 * COOLDOWN_MS])
        pipe.zadd(RECENT_PREFIX + a, {b: when})
        pipe.zadd(RECENT_PREFIX + b, {a: when})
    for user in rng.sample(USERS, 2):
        pipe.hset(MATCHES_KEY, user, "outsider|polite")
    pipe.execute()


def _index_holds_the_queue(r: redis.Redis) -> None:
    """Each searcher is in its kind's index and its interests' indexes, scored like the
    queue, and nobody else is in any of them."""
    expected: dict[str, dict[str, float]] = {}
    profiles = _hash(r, PROFILES_KEY)
    for user, since in _scored(r, QUEUE_KEY):
        profile = _profile(profiles.get(user, "{}"))
        if not profile.interests:
            kind = QUEUE_BARE_KEY
        else:
            kind = QUEUE_ONLY_KEY if profile.interests_only else QUEUE_OPEN_KEY
        for key in (kind, *(QUEUE_TAG_PREFIX + tag for tag in profile.interests)):
            expected.setdefault(key, {})[user] = since
    keys = [QUEUE_BARE_KEY, QUEUE_OPEN_KEY, QUEUE_ONLY_KEY] + [
        _text(k) for k in r.scan_iter(match=QUEUE_TAG_PREFIX + "*")
    ]
    found = {key: dict(_scored(r, key)) for key in keys}
    assert expected == {key: entries for key, entries in found.items() if entries}


@contextmanager
def _live_instance(r: redis.Redis) -> Iterator[None]:
    """Instance ``live`` is alive (a heartbeat ahead and a subscriber on its channel);
    ``dead`` missed its heartbeat."""
    r.zadd(INSTANCES_KEY, {"live": _clock(r) + 3_600_000, "dead": 0})
    with r.pubsub() as subscriber:
        subscriber.subscribe(instance_channel("live"))
        subscriber.get_message(timeout=5)  # the subscription's confirmation
        yield


def _decide(
    r: redis.Redis, scripts: Scripts, args: tuple[int, str], kind: str, user: str, profile: Profile
) -> tuple[str, str] | None:
    """Run step ``kind`` by ``user`` (``args``: the interest wait, the match id); the match it
    made, if any."""
    wait_ms, token = args
    search_ms = [TIMEOUT_MS, wait_ms, COOLDOWN_MS]
    if kind == "search":
        return _made(scripts.search(KEYS, [*search_ms, token, user, "", _dump(profile)], r)[4])
    if kind == "available":
        keys = [*KEYS, instance_users_key("live")]
        return _made(scripts.available(keys, [*search_ms, token, user, "live", _dump(profile)], r)[1])
    done = scripts.search_tick(KEYS, [*search_ms, token, TICK_BATCH], r)
    assert [] == done[0], "nobody times out"
    assert len(done) <= 3, "one searcher was due"
    return _made(done[2]) if len(done) == 3 else None


def _leave(r: redis.Redis, scripts: Scripts, rng: random.Random, kind: str, user: str, token: str) -> None:
    """A step that decides no match by the queue: ``user`` cancels, or asks for an immediate
    pick (leaving the queue), or someone in a match hangs up."""
    if kind == "cancel":
        queued = [u for u, _ in _scored(r, QUEUE_KEY)]
        scripts.cancel_search([POOL_KEY], [rng.choice(queued or USERS)], r)
    elif kind == "request":
        pick, now_s, wanted = repr(rng.random()), _clock(r) / 1000, _dump(_random_profile(rng))
        args: list[str | float] = [user, "", pick, PICK_DRAWS, now_s, wanted, COOLDOWN_MS, token]
        scripts.request_peer(KEYS, args, r)
    else:
        matched = {u: value.split("|")[0] for u, value in _hash(r, MATCHES_KEY).items()}
        if matched:
            leaver = rng.choice(sorted(matched))
            scripts.hangup([POOL_KEY, MATCHES_KEY], [leaver, matched[leaver]], r)


def _due_alone(r: redis.Redis, rng: random.Random) -> str | None:
    """A queued online searcher made the only one due (the next tick looks at it alone)."""
    queued = [u for u, _ in _scored(r, QUEUE_KEY)]
    presence = _hash(r, PRESENCE_KEY)
    live = [u for u in queued if presence.get(u) == "live|c"]
    if not live:
        return None
    user = rng.choice(live)
    r.zadd(DUE_KEY, dict.fromkeys(queued, FAR), xx=True)
    r.zadd(DUE_KEY, {user: 0})
    return user


@pytest.mark.parametrize("wait_ms", [10_000, 0])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_scripts_make_the_matches_the_rules_make(
    redis_server: RedisServer, seed: int, wait_ms: int
) -> None:
    rng = random.Random(seed)
    scripts = Scripts()
    compared = ambiguous = matches = 0
    indexed = False  # the first step that decides builds the indexes
    with redis_server.client() as r, _live_instance(r):
        _seed_state(r, rng, wait_ms)
        for step in range(250):
            token = f"m{seed}-{step}"
            kind = rng.choice(STEPS)
            user = rng.choice([u for u in USERS if not r.hexists(MATCHES_KEY, u)])
            profile = _random_profile(rng)
            if kind == "tick":
                due = _due_alone(r, rng)
                if due is None:
                    continue
                user = due
            if kind not in ("search", "available", "tick"):
                _leave(r, scripts, rng, kind, user, token)
            else:
                state = Snapshot(r)
                before = _clock(r)
                made = _decide(r, scripts, (wait_ms, token), kind, user, profile)
                after = _clock(r)
                expected = {_expected(state, wait_ms, kind, user, profile, now) for now in (before, after)}
                if len(expected) == 1:
                    assert expected == {made}, (step, kind, user, profile)
                    compared += 1
                else:
                    ambiguous += 1
                matches += made is not None
                indexed = True
            if indexed:
                _index_holds_the_queue(r)
        for user, _ in _scored(r, QUEUE_KEY):
            assert 1 == scripts.cancel_search([POOL_KEY], [user], r)
        _index_holds_the_queue(r)
        left = [_text(k) for k in r.scan_iter(match="aleatoria:search:queue*")]
    assert [] == left
    assert compared >= 100 and ambiguous <= 5, (compared, ambiguous)
    assert matches >= 20, matches
