"""The search task: announces what the search queue decided (PROTOCOL.md section 12).

How this works. The store decides every match of the queue atomically (the memory store in
``aleatoria.search``, the Redis store in one Lua script per step); whoever made a match must
tell both users, wherever they are connected. One task per instance asks the store for its
events (``Store.search_events``: it also times out and re-matches the searchers that are due)
whenever the store wakes it or its delay runs out -- in memory mode exactly at the next due
time, in Redis mode every ``search_tick`` seconds on every instance (the tick script is
atomic, so each due event is taken by one instance only). Each match becomes one
``assign_role`` per side, sent through the router with the header that makes the user's
instance mirror the match; each timeout becomes ``no_peer_available``. A user on another
instance is told through ``Router.send_surely``: nobody else will tell it, so a passing bus
outage (a stall, Redis failing over) is waited out, in a task of this one's nursery, rather
than losing the frame.

A requester whose search matched at once hears ``searching`` first: the store wakes this task
from inside the request, and the task runs only once the requester's session yields, after
it has queued its ``searching`` reply.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial

import trio

from aleatoria import messages as m
from aleatoria.codec import encode_reply
from aleatoria.core import match_frames
from aleatoria.ice import IcePolicy
from aleatoria.metrics import Stats
from aleatoria.router import Router
from aleatoria.search import SearchEvents
from aleatoria.store import Store

log = logging.getLogger("aleatoria.searching")


async def search_forever(
    store: Store, router: Router, ice: IcePolicy, stats: Stats, retry: float = 30.0
) -> None:
    """Announce the queue's matches and timeouts until cancelled; ``retry``: seconds a frame
    for a user on another instance is tried while the bus cannot carry it
    (``ALEATORIA_ANNOUNCE_RETRY``). A store error (Redis down: the store answers with no
    events) never ends the task."""
    wake = trio.Event()

    def poke() -> None:
        wake.set()

    async with trio.open_nursery() as retries:
        # A match that ends before this task runs is announced first, by the store's call.
        store.on_search_events(poke, partial(_announce_now, router=router, ice=ice, stats=stats))
        while True:
            wake = trio.Event()
            announce(await store.search_events(), router, ice, stats, retries, retry)
            delay = store.search_delay()
            with trio.move_on_after(math.inf if delay is None else delay):
                await wake.wait()


def _announce_now(events: SearchEvents, *, router: Router, ice: IcePolicy, stats: Stats) -> None:
    # A match about to end (memory store): every side it names is here, so no retries.
    announce(events, router, ice, stats)


def announce(
    events: SearchEvents,
    router: Router,
    ice: IcePolicy,
    stats: Stats,
    retries: trio.Nursery | None = None,
    retry: float = 30.0,
) -> None:
    """Tell both sides of each match, and each searcher whose search timed out."""
    unix_now = int(time.time())
    for match in events.matches:
        stats.count_match(len(match.common))
        stats.search_fallbacks += len(match.fallback)
        for waited in match.waited:
            stats.search_wait.observe(waited)
        for user, data, extra in match_frames(match, ice, unix_now):
            _tell(router, retries, retry, user, data, m.ASSIGN_ROLE, *extra)
        log.debug(
            "event=search_match impolite=%s polite=%s common=%d",
            match.impolite,
            match.polite,
            len(match.common),
        )
    for user in events.timeouts:
        stats.search_timeouts += 1
        data = encode_reply(m.NO_PEER_AVAILABLE, user, m.NoPeer(message=m.NO_PEER_TEXT))
        _tell(router, retries, retry, user, data, m.NO_PEER_AVAILABLE)


def _tell(
    router: Router,
    retries: trio.Nursery | None,
    retry: float,
    user: str,
    data: bytes,
    kind: str,
    *extra: str,
) -> None:
    if retries is None or router.hub.clients.get(user) is not None or router.bus is None:
        router.send(user, data, kind, *extra)
    else:  # on another instance: worth waiting out a bus outage for
        retries.start_soon(partial(router.send_surely, user, data, kind, *extra, window=retry))
