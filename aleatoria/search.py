"""Matching with interests, language and a waiting queue (PROTOCOL.md section 12), pure.

How this works. A user asks for a partner either at once (``wait`` absent: the original
immediate pick among pooled users, ``matchmaking``) or by joining the search queue (``wait:
true``). Searchers are matched with each other and with pooled users, by these rules:

- ``compatible(a, b)``: not the same user, not blocked either way (nor across the shadow-ban
  line), neither in a live match, the same language when both gave one, not each other's
  partner within the rematch cooldown (when one of them is a searcher), and interests first:
  a searcher with interests accepts a partner without a common interest only once it has
  waited ``interest_wait`` — never with ``interests_only``.
- The queue never holds a compatible pair, nor a searcher compatible with a pooled user (the
  invariant). So when one user ``x`` arrives or changes (a new searcher, a newly pooled
  user, a searcher whose interest wait or a cooldown just ran out), ``on_change(x)`` is the
  whole decision: the oldest searcher older than ``x`` that is compatible with it gets ``x``
  (nobody is passed over by a later compatible searcher); otherwise, if ``x`` searches, ``x``
  is served and takes the compatible candidate (newer searchers and pooled users) sharing
  the most interests, then the one waiting longest. One step restores the invariant: a
  match removes two users, which makes no other pair compatible.
- Time changes compatibility in two ways only (an interest wait or a cooldown running out),
  so each searcher has a due time (``due``): the earliest of its timeout and those; the
  timer runs ``on_change`` for each searcher that is due, oldest first, and answers
  ``no_peer_available`` to those whose search timed out.
- A block removed (``unblock_user``) makes one pair compatible: each of the two that searches
  is looked at again (``recheck``; on Redis it becomes due at once, for the next tick).

``Search`` applies these rules to a ``Matchmaker`` (the memory store's; the Redis store runs
the same rules as Lua, ``store.redis_search``). Profiles are parsed and normalised here.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import attrs

from aleatoria.errors import INVALID_PAYLOAD, TOO_LARGE, ClientError
from aleatoria.matchmaking import IMPOLITE, Matchmaker, RequestOutcome

MAX_INTERESTS = 10
MAX_INTEREST_CHARS = 32
# A search's walk over the queue looks at most at this many searchers who may match it for
# their interests (each of three walks: older; newer sharing an interest; newer sharing none):
# the Redis store's bound (``store.redis_search``, "Cost"), and the same trade-off.
SCAN_LIMIT = 64

# ISO 639-1: the two-letter language codes.
_ISO_639_1_CODES = """
aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs
cu cv cy da de dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha
he hi ho hr ht hu hy hz ia id ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn
ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb
nd ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd
se sg si sk sl sm sn so sq sr ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw
ty ug uk ur uz ve vi vo wa wo xh yi yo za zh zu
"""
ISO_639_1 = frozenset(_ISO_639_1_CODES.split())


@attrs.frozen
class Profile:
    """What a user looks for: interests (normalised: trimmed, case-folded, no duplicates, in
    the order given), a language (ISO 639-1, lower case) and whether only a common interest
    will do."""

    interests: tuple[str, ...] = ()
    language: str | None = None
    interests_only: bool = False

    @property
    def empty(self) -> bool:
        return not self.interests and self.language is None

    def to_json(self) -> dict[str, Any]:
        """The compact form the Redis store keeps (and its Lua reads)."""
        data: dict[str, Any] = {"i": list(self.interests)}
        if self.language is not None:
            data["l"] = self.language
        if self.interests_only:
            data["o"] = 1
        return data


NO_PROFILE = Profile()


def parse_profile(interests: object, language: object, interests_only: object) -> Profile:
    """A profile from a request's payload fields (None: absent). Raises ClientError:
    ``invalid_payload`` for a value of the wrong kind, ``too_large`` for too many or too
    long interests (PROTOCOL.md section 12)."""
    tags: list[str] = []
    if interests is not None:
        if not isinstance(interests, list):
            raise ClientError(INVALID_PAYLOAD, "payload.interests must be a list of strings.")
        if len(interests) > MAX_INTERESTS:
            raise ClientError(TOO_LARGE, f"payload.interests has more than {MAX_INTERESTS} entries.")
        for raw in interests:
            if not isinstance(raw, str):
                raise ClientError(INVALID_PAYLOAD, "payload.interests must be a list of strings.")
            tag = raw.strip().casefold()
            if not tag:
                raise ClientError(INVALID_PAYLOAD, "payload.interests has an empty entry.")
            if len(tag) > MAX_INTEREST_CHARS:
                raise ClientError(
                    TOO_LARGE, f"payload.interests has an entry longer than {MAX_INTEREST_CHARS} characters."
                )
            if tag not in tags:
                tags.append(tag)
    code: str | None = None
    if language is not None:
        if not isinstance(language, str) or language.strip().lower() not in ISO_639_1:
            raise ClientError(INVALID_PAYLOAD, "payload.language must be an ISO 639-1 code such as 'en'.")
        code = language.strip().lower()
    if interests_only is not None and not isinstance(interests_only, bool):
        raise ClientError(INVALID_PAYLOAD, "payload.interestsOnly must be a boolean.")
    return Profile(tuple(tags), code, bool(interests_only))


@attrs.frozen
class SearchRules:
    """The timings of section 12 (from ``Config``), in seconds."""

    timeout: float = 120.0
    interest_wait: float = 10.0
    cooldown: float = 300.0


@attrs.define  # treated as immutable; not frozen: one is made per pool (setattr per field)
class Candidate:
    """A searcher (``searcher``) or a pooled user, waiting since ``since``."""

    user: str
    profile: Profile
    since: float
    searcher: bool


class World(Protocol):
    """What compatibility needs besides the two profiles."""

    def barred(self, a: str, b: str) -> bool:
        """Blocked either way, or one shadow-banned and the other not."""
        ...

    def in_match(self, user: str) -> bool: ...

    def recent(self, a: str, b: str, now: float) -> bool:
        """``a`` and ``b`` were partners within the rematch cooldown."""
        ...


def common(a: Profile, b: Profile) -> tuple[str, ...]:
    """The interests ``a`` and ``b`` share, in ``a``'s order."""
    if not a.interests or not b.interests:
        return ()
    theirs = set(b.interests)
    return tuple(tag for tag in a.interests if tag in theirs)


def _interests_allow(c: Candidate, shared: bool, now: float, rules: SearchRules) -> bool:
    if not c.searcher or not c.profile.interests or shared:
        return True
    return not c.profile.interests_only and c.since + rules.interest_wait <= now


def compatible(a: Candidate, b: Candidate, now: float, rules: SearchRules, world: World) -> bool:
    """Whether ``a`` and ``b`` may be matched now (the module's rules)."""
    if a.user == b.user:
        return False
    la, lb = a.profile.language, b.profile.language
    if la is not None and lb is not None and la != lb:
        return False
    shared = bool(common(a.profile, b.profile))
    if not (_interests_allow(a, shared, now, rules) and _interests_allow(b, shared, now, rules)):
        return False
    if world.barred(a.user, b.user) or world.in_match(a.user) or world.in_match(b.user):
        return False
    return not ((a.searcher or b.searcher) and world.recent(a.user, b.user, now))


def preference(x: Candidate, c: Candidate) -> tuple[int, float, str]:
    """Sort key of ``x``'s candidates: most common interests, then longest waiting (then the
    name, so the choice is a function of the state)."""
    return (-len(common(x.profile, c.profile)), c.since, c.user)


def on_change(
    queue: Sequence[Candidate],
    pool: Iterable[Candidate],
    x: Candidate,
    now: float,
    rules: SearchRules,
    world: World,
) -> tuple[Candidate, Candidate] | None:
    """The match (served searcher, partner) ``x``'s arrival or change makes, if any.
    ``queue``: the searchers, oldest first (``x`` among them if it searches); ``pool``: the
    pooled users. Assumes the invariant held for everyone but ``x``."""
    newer: list[Candidate] = []
    older = True
    for s in queue:
        if s.user == x.user:
            older = False
            continue
        if older:
            if compatible(s, x, now, rules, world):
                return s, x
        elif x.searcher:
            newer.append(s)
    if not x.searcher:
        return None
    found = [c for c in (*newer, *pool) if compatible(x, c, now, rules, world)]
    if not found:
        return None
    return x, min(found, key=lambda c: preference(x, c))


def due(c: Candidate, now: float, rules: SearchRules, cooldowns_end: Iterable[float] = ()) -> float:
    """When searcher ``c`` must be looked at again: its timeout, the end of its interest wait
    (if that can widen its choice and is still ahead) or the end of a cooldown (``cooldowns_end``,
    those still ahead), whichever comes first."""
    moments = [c.since + rules.timeout]
    wait_end = c.since + rules.interest_wait
    if c.profile.interests and not c.profile.interests_only and wait_end > now:
        moments.append(wait_end)
    moments += [end for end in cooldowns_end if end > now]
    return min(moments)


@attrs.frozen
class Match:
    """A match the search made: ``impolite`` was served (the older searcher), ``polite`` is
    its partner. ``fallback``: the searchers of the two who gave interests and got none in
    common; ``waited``: each searcher's seconds in the queue."""

    impolite: str
    polite: str
    match_id: str
    common: tuple[str, ...] = ()
    fallback: tuple[str, ...] = ()
    waited: tuple[float, ...] = ()


@attrs.frozen
class SearchOutcome:
    """What ``search`` answers the requester: its place (``position``, 1 = first) and how many
    users are online, or (``resend``) its live match again; ``ended_peer``: a match it ended
    ("next"). Matches the search made are reported separately (the store's ``search_events``)."""

    profile: Profile = NO_PROFILE
    position: int = 0
    online: int = 0
    resend: RequestOutcome | None = None
    ended_peer: str | None = None


@attrs.frozen
class SearchEvents:
    """What happened in the queue since the last look: matches to announce, and searchers
    whose search timed out (they get ``no_peer_available``)."""

    matches: tuple[Match, ...] = ()
    timeouts: tuple[str, ...] = ()
    queue_length: int = 0


class Search:
    """The search queue of one process on a ``Matchmaker`` (the memory store's). Every pool
    change goes through here, so the pooled users' profiles stay in step with the pool."""

    def __init__(
        self,
        matchmaker: Matchmaker,
        rules: SearchRules,
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self.mm = matchmaker
        self.rules = rules
        self.clock = clock
        self._rng = rng or random.Random()
        self._queue: dict[str, Candidate] = {}  # searchers, oldest first
        # The queue's indexes (see ``_meetable``), each oldest first: searchers by interest,
        # and those who may match without a common interest (none given; or interests, not
        # interestsOnly, once the interest wait has passed). ``_place``: each searcher's
        # place in the queue's order (a counter), to merge them.
        self._queue_tags: dict[str, dict[str, Candidate]] = {}
        self._bare: dict[str, Candidate] = {}
        self._open: dict[str, Candidate] = {}
        self._place: dict[str, int] = {}
        self._places = itertools.count()
        self._last_place = -1  # the newest place given
        self._due: dict[str, float] = {}
        # (due, place, user) for each searcher's due time, earliest first; an entry whose
        # time is no longer the searcher's (it left, or became due later) is skipped.
        self._due_heap: list[tuple[float, int, str]] = []
        self._pooled: dict[str, Candidate] = {}  # pooled users' profiles, longest pooled first
        self._tagged: dict[str, set[str]] = {}  # interest -> pooled users who gave it
        self._recent: dict[str, dict[str, float]] = {}  # user -> partner -> when matched
        self._matches: list[Match] = []
        self._timeouts: list[str] = []
        self.on_events: Callable[[], None] | None = None  # new matches or timeouts to announce
        # Announces events at once (the search task's ``announce``), before a match ends.
        self.on_flush: Callable[[SearchEvents], None] | None = None
        matchmaker.before_end = self._flush

    # -- the World --------------------------------------------------------------------------

    def barred(self, a: str, b: str) -> bool:
        match_filter = self.mm.filter
        if match_filter is None:
            return False
        blocked = match_filter.barred(a)
        if blocked and b in blocked:
            return True
        blocked = match_filter.barred(b)
        if blocked and a in blocked:
            return True
        return match_filter.shadowed(a) != match_filter.shadowed(b)

    def in_match(self, user: str) -> bool:
        return self.mm.peer_of(user) is not None

    def recent(self, a: str, b: str, now: float) -> bool:
        when = self._recent.get(a, {}).get(b)
        return when is not None and now - when < self.rules.cooldown

    # -- queries ------------------------------------------------------------------------------

    def queue(self) -> list[Candidate]:
        return list(self._queue.values())

    def pooled(self) -> list[Candidate]:
        """The pooled users with their profiles, longest pooled first."""
        return [c for c in self._pooled.values() if self.mm.in_pool(c.user)]

    def queue_length(self) -> int:
        return len(self._queue)

    def searching(self, user: str) -> bool:
        return user in self._queue

    def next_due(self) -> float | None:
        """The earliest due time (on ``clock``), or None when nobody searches."""
        heap = self._due_heap
        while heap and self._due.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)  # stale
        return heap[0][0] if heap else None

    # -- commands -----------------------------------------------------------------------------

    def set_available(self, user: str, profile: Profile = NO_PROFILE) -> str | None:
        """Pool ``user`` (ending its match, leaving the queue); the oldest compatible searcher
        gets it. Returns the peer whose match ended."""
        self._dequeue(user)
        ended = self.mm.set_available(user)
        now = self.clock()
        self._unpool(user)
        candidate = Candidate(user, profile, now, False)
        self._pooled[user] = candidate
        for tag in profile.interests:
            self._tagged.setdefault(tag, set()).add(user)
        self._settle(candidate, now)
        return ended

    def set_unavailable(self, user: str) -> None:
        self._dequeue(user)
        self._unpool(user)
        self.mm.set_unavailable(user)

    def disconnect(self, user: str) -> str | None:
        self._dequeue(user)
        self._unpool(user)
        return self.mm.disconnect(user)

    def cancel(self, user: str) -> None:
        self._dequeue(user)

    def request_peer(
        self, user: str, current_peer: str | None, profile: Profile = NO_PROFILE
    ) -> RequestOutcome:
        """The immediate path: the original pick, preferring the most common interests and
        keeping to the requester's language."""
        self._dequeue(user)
        choose = None if profile.empty else (lambda excluded: self._choose(user, profile, excluded))
        outcome = self.mm.request_peer(user, current_peer, choose)
        if outcome.peer is not None and not outcome.resend:
            peer = self._pooled.get(outcome.peer)
            self._unpool(user)
            self._unpool(outcome.peer)
            self._remember(user, outcome.peer, self.clock())
            shared = common(profile, peer.profile) if peer is not None else ()
            if shared:  # () is the outcome's own (evolve costs ~3 us a match)
                self.mm.share(user, outcome.peer, shared)  # a resend carries them too
                outcome = attrs.evolve(outcome, common=shared)
        return outcome

    def search(self, user: str, current_peer: str | None, profile: Profile) -> SearchOutcome:
        """``user`` joins the queue (leaving the pool, or its place in the queue); a match it
        makes at once is reported with the others (``events``)."""
        self._dequeue(user)
        ended: str | None = None
        partner = self.mm.peer_of(user)
        if partner is not None:
            if partner != current_peer:
                return SearchOutcome(profile=profile, resend=self.mm.resend(user, partner))
            self.mm.hangup(user, partner)
            ended = partner
        self._unpool(user)
        self.mm.set_unavailable(user)
        now = self.clock()
        candidate = Candidate(user, profile, now, True)
        self._enqueue(candidate)
        position = len(self._queue)
        self._set_due(user, due(candidate, now, self.rules, self._cooldowns_end(user)))
        self._settle(candidate, now)
        if user in self._queue and self.on_events is not None:
            # Still waiting: it brings a due time (fallback, timeout) that the search task,
            # perhaps asleep with nothing due, must wake for.
            self.on_events()
        return SearchOutcome(profile=profile, position=position, ended_peer=ended)

    def recheck(self, *users: str) -> None:
        """A block between ``users`` was removed: each of them that searches runs
        ``on_change`` again, oldest first, so the pair is matched now if it may be."""
        now = self.clock()
        for user in sorted((u for u in set(users) if u in self._queue), key=self._place.__getitem__):
            candidate = self._queue.get(user)  # gone if the first one took it
            if candidate is not None:
                self._settle(candidate, now)

    def tick(self) -> None:
        """Look at every searcher that is due (oldest first): time out or re-match it."""
        now = self.clock()
        heap, due_users = self._due_heap, set()
        while heap and heap[0][0] <= now:
            when, _, user = heapq.heappop(heap)
            if self._due.get(user) == when:
                due_users.add(user)
        for user in sorted(due_users, key=self._place.__getitem__):  # oldest first
            candidate = self._queue.get(user)
            if candidate is None:
                continue
            if candidate.since + self.rules.timeout <= now:
                self._dequeue(user)
                self._timeouts.append(user)
                continue
            self._set_due(user, due(candidate, now, self.rules, self._cooldowns_end(user)))
            self._settle(candidate, now)
        if self._timeouts and self.on_events is not None:
            self.on_events()

    def events(self) -> SearchEvents:
        """The matches and timeouts since the last call (and the queue's length)."""
        events = SearchEvents(tuple(self._matches), tuple(self._timeouts), len(self._queue))
        self._matches.clear()
        self._timeouts.clear()
        return events

    def _flush(self) -> None:
        # A live match is about to end (a disconnect, a re-pooling, a hangup, a block). The
        # search task announces matches only once it runs, after the request that made them:
        # a match ending in between had its ``hangup`` sent before its ``assign_role``, and
        # its survivor was then told of a match with a user who had gone. So the matches not
        # yet announced are announced now, before the end is told.
        if self._matches and self.on_flush is not None:
            self.on_flush(self.events())

    def forget_cooldowns(self) -> None:
        """Drop partners older than the cooldown (bounded memory)."""
        now = self.clock()
        for user in list(self._recent):
            partners = self._recent[user]
            for old in [p for p, when in partners.items() if now - when >= self.rules.cooldown]:
                del partners[old]
            if not partners:
                del self._recent[user]

    # -- internals ----------------------------------------------------------------------------

    def _settle(self, x: Candidate, now: float) -> None:
        if not self._queue and not x.searcher:
            return  # nobody searches: a newly pooled user is nobody's (on_change would say so)
        pair = on_change(self._meetable(x, now), self._pool_for(x, now), x, now, self.rules, self)
        if pair is None:
            return
        served, partner = pair
        for c in pair:
            if c.searcher:
                self._dequeue(c.user)
            else:
                self._unpool(c.user)
                self.mm.set_unavailable(c.user)
        match_id = self.mm.pair(served.user, partner.user)
        self._remember(served.user, partner.user, now)
        shared = common(served.profile, partner.profile)
        self.mm.share(served.user, partner.user, shared)
        self._matches.append(
            Match(
                served.user,
                partner.user,
                match_id,
                shared,
                fallback=tuple(c.user for c in pair if c.searcher and c.profile.interests and not shared),
                waited=tuple(now - c.since for c in pair if c.searcher),
            )
        )
        if self.on_events is not None:
            self.on_events()

    def _choose(self, user: str, profile: Profile, excluded: set[str]) -> str | None:
        """The immediate pick for a requester with a profile: among suitable pooled users
        those sharing the most interests, uniformly; with none, uniformly among all the
        suitable ones (unless ``interests_only``)."""

        def suitable(other: str) -> bool:
            if other in excluded or self.barred(user, other):
                return False
            pooled = self._pooled.get(other)
            theirs = pooled.profile.language if pooled is not None else None
            return profile.language is None or theirs is None or theirs == profile.language

        by_count: dict[int, list[str]] = {}
        for other in {u for tag in profile.interests for u in self._tagged.get(tag, ())}:
            pooled = self._pooled.get(other)
            if pooled is not None and self.mm.in_pool(other):
                by_count.setdefault(len(common(profile, pooled.profile)), []).append(other)
        for count in sorted(by_count, reverse=True):
            found = [other for other in sorted(by_count[count]) if suitable(other)]
            if found:
                return self._rng.choice(found)
        if profile.interests_only and profile.interests:
            return None
        return first_drawn(self.mm.pool_view(), self._rng, suitable)

    def _cooldowns_end(self, user: str) -> list[float]:
        return [when + self.rules.cooldown for when in self._recent.get(user, {}).values()]

    def _remember(self, a: str, b: str, now: float) -> None:
        self._recent.setdefault(a, {})[b] = now
        self._recent.setdefault(b, {})[a] = now

    # Cost. ``on_change`` is given only the searchers and pooled users whose interests let
    # them meet ``x`` (``_meetable``, ``_pool_for``), in the order it would meet them: the
    # others are never compatible, so the decision is the same. It was given the whole
    # queue and pool: one address's 600 connections keeping interestsOnly searches with
    # disjoint interests going at the match rate took 0.75 of a core (0.9 ms a search at
    # 1,000 searchers) and a calm client's ping p99 from 24 to 248 ms. Those who may meet
    # ``x`` but are turned away for another reason (a language, a block, a recent partner)
    # cost a check each, at most ``SCAN_LIMIT`` a walk; the pooled users are read up to the
    # first compatible one, without a bound (as in Redis).

    def _meetable(self, x: Candidate, now: float) -> list[Candidate]:
        """The searchers ``x`` may be matched with for their interests and its own (and
        ``x`` if it searches), oldest first: those sharing one of its interests and, if ``x``
        may match without one, those who may too -- merged from the indexes as they come, up
        to ``SCAN_LIMIT`` older than ``x``, and as many newer sharing an interest and newer
        sharing none (past a bound ``x`` may pass over one it could match: it is looked at
        again when its wait or a cooldown ends, or it times out; no rule is broken)."""
        rules, place = self.rules, self._place
        sources: list[Iterable[Candidate]] = [
            self._queue_tags[tag].values() for tag in x.profile.interests if tag in self._queue_tags
        ]
        if _interests_allow(x, False, now, rules):
            sources.append(self._bare.values())
            # Oldest first: those whose interest wait passed come first.
            passed = itertools.takewhile(lambda c: c.since + rules.interest_wait <= now, self._open.values())
            sources.append(passed)
        mine = place[x.user] if x.searcher and x.user in self._queue else None
        # Nobody is newer than a searcher that has just joined: its walk ends with the older.
        last = mine is None or mine == self._last_place
        older: list[Candidate] = []
        newer: list[Candidate] = []
        seen: set[str] = {x.user}
        shared = other = 0
        for c in heapq.merge(*sources, key=lambda c: place[c.user]):
            if c.user in seen:
                continue
            seen.add(c.user)
            if mine is None or place[c.user] < mine:
                if len(older) < SCAN_LIMIT:
                    older.append(c)
                elif last:
                    break
            elif common(x.profile, c.profile):
                if shared < SCAN_LIMIT:
                    shared += 1
                    newer.append(c)
            elif other < SCAN_LIMIT:
                other += 1
                newer.append(c)
            if shared == other == SCAN_LIMIT:
                break
        return older + newer if mine is None else [*older, x, *newer]

    def _pool_for(self, x: Candidate, now: float) -> list[Candidate]:
        """The pooled users searcher ``x`` may take: those sharing one of its interests and,
        if it may match without one, the longest pooled compatible ones (its choice among
        those sharing none)."""
        if not x.searcher:
            return []
        found: dict[str, Candidate] = {}
        for tag in x.profile.interests:
            for user in self._tagged.get(tag, ()):
                c = self._pooled.get(user)
                if c is not None and self.mm.in_pool(user):
                    found[user] = c
        if _interests_allow(x, False, now, self.rules):
            first: Candidate | None = None
            for c in self._pooled.values():  # longest pooled first
                if first is not None and c.since != first.since:
                    break  # the ties of the first compatible one are in: on_change picks by name
                if c.user in found or not self.mm.in_pool(c.user):
                    continue
                if compatible(x, c, now, self.rules, self):
                    first = first or c
                    found[c.user] = c
        return list(found.values())

    def _enqueue(self, c: Candidate) -> None:
        user = c.user
        self._queue[user] = c
        self._place[user] = self._last_place = next(self._places)
        for tag in c.profile.interests:
            self._queue_tags.setdefault(tag, {})[user] = c
        if not c.profile.interests:
            self._bare[user] = c
        elif not c.profile.interests_only:
            self._open[user] = c

    def _set_due(self, user: str, when: float) -> None:
        self._due[user] = when
        heapq.heappush(self._due_heap, (when, self._place[user], user))
        if len(self._due_heap) > 2 * len(self._due) + 64:  # bounded: drop the stale entries
            self._due_heap = [(w, self._place[u], u) for u, w in self._due.items()]
            heapq.heapify(self._due_heap)

    def _dequeue(self, user: str) -> None:
        c = self._queue.pop(user, None)  # mostly not there: every pool and request asks
        if c is None:
            return
        self._due.pop(user, None)
        del self._place[user]
        for tag in c.profile.interests:
            tagged = self._queue_tags.get(tag)
            if tagged is not None:
                tagged.pop(user, None)
                if not tagged:
                    del self._queue_tags[tag]
        self._bare.pop(user, None)
        self._open.pop(user, None)

    def _unpool(self, user: str) -> None:
        pooled = self._pooled.pop(user, None)
        if pooled is None:
            return
        for tag in pooled.profile.interests:
            users = self._tagged.get(tag)
            if users is not None:
                users.discard(user)
                if not users:
                    del self._tagged[tag]


def first_drawn(items: Sequence[str], rng: random.Random, ok: Callable[[str], bool]) -> str | None:
    """The first item ``ok`` accepts in a uniformly random order of ``items`` (a lazy
    Fisher-Yates shuffle: uniform over the accepted items, one draw per item looked at)."""
    swapped: dict[int, int] = {}
    left = len(items)
    while left > 0:
        j = rng.randrange(left)
        index = swapped.get(j, j)
        left -= 1
        swapped[j] = swapped.get(left, left)
        if ok(items[index]):
            return items[index]
    return None


__all__ = [
    "IMPOLITE",
    "NO_PROFILE",
    "Candidate",
    "Match",
    "Profile",
    "Search",
    "SearchEvents",
    "SearchOutcome",
    "SearchRules",
    "common",
    "compatible",
    "on_change",
    "parse_profile",
]
