"""Search storms (PROTOCOL.md section 12): 300 searchers for 20 s with random interests
(Zipf-like), languages, interestsOnly, blocks, cancels, disconnects and Next, on 3 instances
sharing Redis (single and Cluster) and on one instance in memory mode. Zero double matches
(every matchId names exactly its two sides, roles complementary), zero rule breaks (block,
language, interestsOnly, the same pair twice within the cooldown), zero fairness violations
(a searcher matched while an older compatible one surely waited: ``searchcheck.analyse``), and
every search answered: matched, timed out or cancelled by its user."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Any

import pytest
import trio
from scaleout_support import instances
from support import SocketPeer, connect

import aleatoria.server
from aleatoria.config import Config
from aleatoria.loadtest.searchcheck import Row, Rules, analyse

USERS = 300
SECONDS = 20.0
TIMINGS: dict[str, float] = {
    "interest_wait": 2.0,
    "search_timeout": 6.0,
    "search_tick": 0.1,
    "rate_limit": 0,
    "match_rate": 0,
    # The storm tests matching, not the noticing of dead instances: the scale-out tests'
    # 1.5 s presence TTL had live instances declared dead under the whole suite's load on 2
    # cores (their searchers kept their places since, but could not be matched meanwhile).
    "presence_ttl": 6.0,
    "heartbeat_interval": 1.0,
}
TAGS = [f"tag{i}" for i in range(20)]
WEIGHTS = [1 / (rank + 1) for rank in range(len(TAGS))]  # Zipf-like


# The fairness check (``searchcheck.analyse``) reads the clients' clock: the server decides
# each match at a moment known only to lie between a request's sending and its reply's
# arrival, and the check counts a searcher as passed over only when that is sure whatever the
# moment, so message latency (announcements here take up to ~0.25 s on the Cluster) is never
# a violation. What it cannot see is how late the server acts on time itself: a pair that
# became compatible because an interest wait ran out is matched when the server next looks at
# the queue -- in memory mode at the due time, on Redis at the next ``search_tick`` (0.1 s
# here) of any instance, both late by the event loop's delays with 300 clients and 3 servers
# on one trio loop sharing 2 cores -- and meanwhile another change may be served first. SLACK
# bounds that lateness. Measured: the fair server shows no violation even at 0 s, and a server
# that serves the youngest compatible searcher instead of the oldest shows the same
# violations (hundreds in memory mode, dozens on Redis) at every slack up to 0.5 s; 1 s is
# well above the tick and the loop's delays, and half the 2 s interest wait it qualifies.
SLACK = 1.0


class Storm:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.users = [f"q{i:03d}" for i in range(USERS)]
        self.blocks = {u: set(self.rng.sample([v for v in self.users if v != u], 2)) for u in self.users}
        self.languages = {u: self.rng.choice([None, None, None, "en", "fr"]) for u in self.users}
        self.rows: dict[str, list[Row]] = defaultdict(list)  # each user's searches, in order
        self.heard: dict[str, set[str]] = defaultdict(set)  # user -> matchIds it heard
        self.doing: dict[str, str] = {}  # user -> what it is doing (for a hung storm's report)
        self.broken: list[str] = []
        self.repeats = 0  # the same assign_role heard again (see ``answered``)
        self.searches = self.matched = self.timeouts = self.cancelled = 0

    def profile(self, user: str) -> dict[str, Any]:
        tags = sorted(set(self.rng.choices(TAGS, WEIGHTS, k=self.rng.randrange(0, 4))))
        payload: dict[str, Any] = {"wait": True, "interests": tags}
        if self.languages[user]:
            payload["language"] = self.languages[user]
        if tags and self.rng.random() < 0.1:
            payload["interestsOnly"] = True
        return payload

    def barred(self, a: str, b: str) -> bool:
        return b in self.blocks[a] or a in self.blocks[b]

    def matched_row(self, row: Row, payload: dict[str, Any]) -> None:
        """``row``'s search got ``assign_role`` ``payload``: record it, check the rules that
        one side can check (the pair's rules are checked in ``verify``)."""
        match_id = payload["matchId"]
        if match_id in self.heard[row.user]:
            self.broken.append(f"{row.user} heard {match_id} twice")
        self.heard[row.user].add(match_id)
        row.end, row.left = "match", trio.current_time()
        row.peer, row.role, row.match_id = payload["peerId"], payload["role"], match_id
        row.common = payload["commonInterests"]
        if row.interests_only and not row.common:
            self.broken.append(f"interestsOnly {row.user} got {row.peer}")
        self.matched += 1

    async def user(self, port: int, user: str, deadline: float) -> None:
        rng = self.rng
        while trio.current_time() < deadline:
            self.doing[user] = "connecting"
            async with connect(port, user, skip=True) as client:
                self.doing[user] = "blocking"
                for other in sorted(self.blocks[user]):
                    await client.request(
                        {"type": "block_user", "payload": {"user": other}}, "user_blocked", skip=True
                    )
                await self.session(client, user, deadline)
                self.doing[user] = "disconnecting"
            # A disconnect ends the session (its search or match goes with it).
            await trio.sleep(rng.random() * 0.2)
        self.doing[user] = "left"

    async def session(self, client: SocketPeer, user: str, deadline: float) -> None:
        """Search, talk, Next, until the deadline. Every message is unambiguous: a search is
        sent only when the previous one was answered (matched or timed out), so an
        ``assign_role`` or ``no_peer_available`` always answers the latest search; a cancel
        ends the connection, so a match that crossed it is never heard (``verify`` finds
        it from the other side)."""
        rng = self.rng
        peer: str | None = None
        while trio.current_time() < deadline:
            payload = self.profile(user)
            if peer is not None:
                payload["currentPeerId"] = peer  # Next
            row = Row(
                user,
                payload["interests"],
                payload.get("language"),
                sent=trio.current_time(),
                interests_only=payload.get("interestsOnly", False),
            )
            self.rows[user].append(row)
            self.searches += 1
            await client.send({"type": "request_random_peer", "payload": payload})
            self.doing[user] = "searching"
            if not await self.answered(client, row):
                return  # cancelled: leave
            peer = row.peer
            self.doing[user] = "talking" if peer is not None else "between searches"
            if peer is not None:
                await trio.sleep(rng.random() * 0.5)  # talking
                if rng.random() < 0.05:
                    return  # disconnect in a call
            elif rng.random() < 0.05:
                return

    async def answered(self, client: SocketPeer, row: Row) -> bool:
        """Wait for ``row``'s search to end: matched or timed out (True), or cancelled by
        this user after a random wait (False)."""
        cancel_at = trio.current_time() + self.rng.random() * 3 if self.rng.random() < 0.1 else None
        # A connection that replaced the one that cancelled (the client reconnected before
        # the server had torn the old one down) owns the user's match, also one that crossed
        # the cancel: its search is then answered by that match's assign_role alone, resent
        # (PROTOCOL.md section 4), with no ``searching``. Waited for a while, then taken so.
        resent_by: float | None = None
        while True:
            if resent_by is not None and trio.current_time() >= resent_by:
                # The match was made for the cancelled search, whose interestsOnly this
                # search's check could not know (the languages and blocks are the user's own);
                # a resent assign_role carries no common interests either.
                self.broken = [b for b in self.broken if b != f"interestsOnly {row.user} got {row.peer}"]
                return True
            with trio.move_on_after(0.2):
                message = await client.recv()
                kind = message["type"]
                if kind == "searching":
                    if row.joined is not None:
                        self.broken.append(f"{row.user}: two searching replies")
                    row.joined = trio.current_time() if row.end == "open" else None
                    if row.end == "match":
                        return True  # the match was announced before the reply: unknown join
                elif kind == "assign_role":
                    if message["payload"]["matchId"] in self.heard[row.user]:
                        # The same assign_role again (a resent one's announcement, or an
                        # announcement sent again after a bus stall): the server says a repeat
                        # may come and clients take it as one. A second match has another id.
                        self.repeats += 1
                        continue
                    if row.end != "open":
                        self.broken.append(f"{row.user}: a second assign_role {message['payload']}")
                    self.matched_row(row, message["payload"])
                    if row.joined is not None:
                        return True
                    resent_by = trio.current_time() + 3.0
                elif kind == "no_peer_available":
                    if row.joined is None or row.end != "open":
                        self.broken.append(f"{row.user}: no_peer_available out of turn")
                    row.end, row.left = "timeout", trio.current_time()
                    self.timeouts += 1
                    return True
                elif kind == "error":
                    self.broken.append(f"{row.user}: {message}")
                continue  # a former peer's hangup
            if cancel_at is not None and row.joined is not None and trio.current_time() >= cancel_at:
                await client.send({"type": "cancel_search"})
                row.end, row.left = "cancel", trio.current_time()
                self.cancelled += 1
                return False

    def resolve_crossed_cancels(self) -> None:
        """A match whose one side cancelled (and left) before hearing it: that side's
        cancelled search may have left the queue at any moment after the match was made, so
        its end is unknown (``lost``: never counted as waiting). A search is matched once, so
        each match heard by one side only needs a cancelled search of its own: earliest heard
        first, each takes the earliest free one that fits it (a match that fits two cancels
        must not use up the only one another match fits). A match left without one is a lost
        announcement. Every cancel that fits a match is ``lost``."""
        unheard = [
            row
            for rows in self.rows.values()
            for row in rows
            if row.end == "match" and row.peer is not None and row.match_id not in self.heard[row.peer]
        ]
        unheard.sort(key=lambda row: row.left or math.inf)
        taken: set[int] = set()  # the cancels given to a match (by id: rows are mutable)
        fitting: list[Row] = []
        for row in unheard:
            assert row.peer is not None
            theirs = self.rows[row.peer]
            crossed = [
                search
                for index, search in enumerate(theirs)
                if search.end == "cancel"
                and search.sent < (row.left or math.inf)
                and (index + 1 == len(theirs) or theirs[index + 1].sent > row.sent)
            ]
            free = [search for search in crossed if id(search) not in taken]
            if free:
                taken.add(id(free[0]))
            else:
                self.broken.append(f"{row.peer} never heard {row.match_id} (with {row.user})")
            fitting += crossed
        for search in fitting:
            search.end, search.left = "lost", None

    def verify(self) -> None:
        rows = [row for user_rows in self.rows.values() for row in user_rows]
        by_id: dict[str, set[tuple[str, str, str | None]]] = defaultdict(set)
        for row in rows:
            if row.end == "match":
                assert row.match_id and row.peer
                by_id[row.match_id].add((row.user, row.peer, row.role))
        for match_id, sides in by_id.items():
            users = {u for u, _, _ in sides}
            mutual = len(sides) == 1 or {(a, b) for a, b, _ in sides} == {(b, a) for a, b, _ in sides}
            roles = len(sides) == 1 or {"impolite", "polite"} == {role for _, _, role in sides}
            assert len(sides) <= 2 and mutual and roles, f"match {match_id} heard as {sides}"
            assert len(users) == len(sides), f"double match {match_id}: {sides}"
        # The pair's rules (either side may be the one that never heard the match).
        seen: set[frozenset[str]] = set()
        for sides in by_id.values():
            user, peer, _ = next(iter(sides))
            if self.barred(user, peer):
                self.broken.append(f"blocked pair {user} {peer}")
            mine, theirs = self.languages[user], self.languages[peer]
            if mine is not None and theirs is not None and mine != theirs:
                self.broken.append(f"languages {user} {peer}")
            pair = frozenset((user, peer))
            if pair in seen:
                self.broken.append(f"rematch within the cooldown: {sorted(pair)}")
            seen.add(pair)
        self.resolve_crossed_cancels()
        rules = Rules(TIMINGS["interest_wait"], Config().rematch_cooldown, SLACK, TIMINGS["search_timeout"])
        figures = analyse([row.to_list() for row in rows], rules, self.barred)
        assert [] == self.broken
        assert self.matched > USERS, "the storm made matches"
        assert figures["fairness_checked"] > USERS, figures
        assert 0 == figures["unfair"], figures["unfair_examples"]
        # Every search was answered (matched, timed out or cancelled): a search left hanging
        # would have kept its user's loop waiting past the storm's deadline (``run_storm``).


async def run_storm(ports: list[int], seed: int) -> Storm:
    storm = Storm(seed)
    deadline = trio.current_time() + SECONDS
    with trio.move_on_after(SECONDS + 60) as hung:
        async with trio.open_nursery() as nursery:
            for i, user in enumerate(storm.users):
                nursery.start_soon(storm.user, ports[i % len(ports)], user, deadline)
    if hung.cancelled_caught:  # say who waited for what (a search never answered?)
        stuck = {user: storm.doing[user] for user in storm.users if storm.doing[user] != "left"}
        open_rows = {user: storm.rows[user][-1] for user in stuck if storm.rows[user]}
        raise AssertionError(f"{len(stuck)} users still busy: {sorted(stuck.items())[:10]}, {open_rows}")
    storm.verify()
    return storm


@pytest.mark.slow
async def test_search_storm_on_three_instances(shared_redis: str) -> None:
    # Defects found here, all fixed: announcements lost to bus stalls (now retried,
    # ``Router.send_surely``, and delivered once), and a searcher that still had a pool entry
    # being taken as a pooled candidate, its interestsOnly ignored (now a queued user is never
    # a pooled candidate nor an immediate pick). Issue 14, on the Cluster: tens of searchers
    # heard ``searching`` and then nothing -- a bus stall declared while no pipeline was in
    # flight never ended, and that instance's announcements to other instances were given up
    # (``test_bus_stall_ends``); old announcements sent again after stalls or while their
    # user was between connections answered new searches (``test_announce_once``).
    async with instances(shared_redis, 3, **TIMINGS) as ports:
        await run_storm(ports, 14)


@pytest.mark.slow
async def test_search_storm_in_memory_mode() -> None:
    config = Config(port=0, **TIMINGS)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        port = await nursery.start(aleatoria.server.serve, config)
        await run_storm([port], 15)
        nursery.cancel_scope.cancel()
