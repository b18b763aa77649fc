"""The search queue's Redis cost (PROTOCOL.md section 12, ``redis_search``): a search step
costs the same however many searchers are queued that cannot match it. Counted, not timed:
the commands the scripts run, from Redis' own ``INFO commandstats`` (commands a script calls
are counted there), on a real redis-server.

Found by a red-team run: 300 searchers from one address with interestsOnly and disjoint
interests, each re-sending its search twice a second, saturated redis-server -- each search
looked at every searcher queued (three commands each), so the queue cost the square of its
length."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any

import redis
from redis_server import RedisServer

from aleatoria.store.redis_client import Scripts
from aleatoria.store.redis_presence import INSTANCES_KEY, PRESENCE_KEY
from aleatoria.store.redis_scripts import BLOCKS_PREFIX, MATCHES_KEY, POOL_KEY, QUEUE_KEY
from aleatoria.store.redis_search import SCAN_LIMIT

KEYS = [POOL_KEY, MATCHES_KEY, PRESENCE_KEY, INSTANCES_KEY]
# Timeout, interest wait, cooldown (ms): nobody times out or falls back during the test.
SEARCH_MS = [600_000, 600_000, 300_000]
# What a script's own call, and the test's, add to the counts.
NOT_THE_SCRIPTS = {"cmdstat_evalsha", "cmdstat_eval", "cmdstat_info", "cmdstat_config|resetstat"}


def _search(scripts: Scripts, r: redis.Redis, user: str, profile: dict[str, Any]) -> Any:
    args: list[str | int] = [*SEARCH_MS, f"m-{user}", user, "", json.dumps(profile)]
    return scripts.search(KEYS, args, r)


def _commands(r: redis.Redis, step: Callable[[], object]) -> int:
    """How many commands ``step``'s scripts ran in Redis."""
    r.config_resetstat()
    step()
    stats = r.info("commandstats")
    return sum(int(entry["calls"]) for name, entry in stats.items() if name not in NOT_THE_SCRIPTS)


def _costs(scripts: Scripts, r: redis.Redis, round_: int) -> dict[str, int]:
    """The commands of one search by each kind of newcomer, and of a queued searcher's
    search again (what the red team's clients did twice a second), at the queue's length."""
    newcomers: dict[str, tuple[str, dict[str, Any]]] = {
        "interests only": (f"o{round_}", {"i": [f"n{round_}"], "o": 1}),
        "interests": (f"i{round_}", {"i": [f"f{round_}"]}),
        "again": ("q0", {"i": ["tag0"], "o": 1}),
    }
    return {kind: _commands(r, partial(_search, scripts, r, *step)) for kind, step in newcomers.items()}


def test_a_search_costs_the_same_whatever_the_searchers_that_cannot_match_it(
    redis_server: RedisServer,
) -> None:
    """10 and then 300 searchers with interestsOnly and disjoint interests are queued; a
    newcomer with interestsOnly, one with interests (before its interest wait ends), and a
    queued searcher searching again each cost the same number of Redis commands at 300 as at
    10 (they used to cost one or more per searcher queued: 3 times as many at 300)."""
    scripts = Scripts()
    with redis_server.client() as r:
        for i in range(300):
            _search(scripts, r, f"q{i}", {"i": [f"tag{i}"], "o": 1})
            if i == 9:
                at_10 = _costs(scripts, r, 10)
        at_300 = _costs(scripts, r, 300)
        assert 300 + 4 == r.zcard(QUEUE_KEY), "nobody matched"
    for kind, cost in at_10.items():
        assert cost <= 40, (kind, at_10)
        assert at_300[kind] <= cost + 2, (kind, at_10, at_300)


def test_searchers_excluded_for_other_reasons_cost_a_bounded_number_of_checks(
    redis_server: RedisServer,
) -> None:
    """Searchers who could match a newcomer but for a block (here: each gave another
    language, so they wait side by side, and each blocked the newcomer) are each looked at,
    but at most ``SCAN_LIMIT`` of them per search: a search costs the same with 4 times that
    many queued as with twice as many."""
    scripts = Scripts()
    costs = []
    with redis_server.client() as r:
        queued = 0
        for size in (2 * SCAN_LIMIT, 4 * SCAN_LIMIT):
            for i in range(queued, size):
                _search(scripts, r, f"q{i}", {"i": [], "l": f"l{i}"})
            queued = size
            user = f"x{size}"
            with r.pipeline(transaction=False) as pipe:
                for i in range(size):
                    pipe.sadd(BLOCKS_PREFIX + f"q{i}", user)
                pipe.execute()
            costs.append(_commands(r, partial(_search, scripts, r, user, {"i": []})))
            assert size + 1 == r.zcard(QUEUE_KEY), "nobody matched"
            scripts.cancel_search([POOL_KEY], [user], r)
    assert costs[1] <= costs[0] + 2, costs
