"""The ``search`` scenario's pure parts: users' profiles, and the checks that need every
worker's searches at once (pairings, rematches within the cooldown, fairness).

How this works. Every search a user makes becomes one row (``Stats.record("search", …)``),
with times on the tool's own clock (Unix seconds; the workers share the machine's clock):
``sent`` (the request left), ``joined`` (its ``searching`` reply arrived), ``left`` (its
``assign_role`` or ``no_peer_available`` arrived; for a search the tool cancelled at the end,
when it sent ``cancel_search``), how it ended (``end``) and, for a match, the peer, role,
matchId and common interests. The server's replies carry no time of their own, so the
server's moments are only known to lie between a request's ``sent`` and its reply's arrival;
every check below uses those bounds so that doubt never counts as a violation.

``analyse`` finds, over all rows:

- ``mismatched``: a matchId that is not exactly two rows naming each other, one impolite
  and one polite, with the same common interests;
- ``rematches``: two users matched again surely within ``cooldown`` seconds: from the earliest
  moment of one match to the latest of the next (a match happens after both requests were
  sent and before both ``assign_role`` arrived);
- ``unfair``: matches in which a searcher was passed over. For a match between ``A``
  (impolite: the side the server served, the older searcher) and ``B``, a searcher ``Y``
  surely waiting then -- its ``searching`` arrived before ``B``'s request was sent, and it
  surely left the queue after the match: its own match's earliest moment, its cancel, or its
  timeout (its request's sending plus ``Rules.timeout`` when known, else the reply's arrival
  minus ``slack``), came after the later ``assign_role`` of ``A`` and ``B``
  -- was passed over when ``Y`` also joined before ``A``'s request and was compatible with
  ``B``, or when ``Y`` was compatible with ``A`` and shares at least as many interests with
  ``A`` as ``B`` does (so ``A`` should have taken ``Y``). Compatible is PROTOCOL.md section
  12's rule as far as the tool can know it, doubt counting as "not compatible": the same
  language when both gave one; a common interest, or else each side with interests had
  surely waited ``interest_wait + slack`` (and did not ask for ``interestsOnly``); not
  partners within ``cooldown + slack`` (any match either side heard of counts, even one the
  other side never heard); not blocked, when the caller says (``barred``: the load tool has
  no blocks, the search storms have). ``slack`` covers what the tool cannot see: on Redis a
  fallback, a cooldown's end or a timeout is acted on at the next ``ALEATORIA_SEARCH_TICK``.

Pure code, no trio.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

EXAMPLES = 5  # unfair matches described in the report


def zipf_weights(count: int, exponent: float) -> list[float]:
    return [1.0 / (rank + 1) ** exponent for rank in range(count)]


def draw_profile(
    rng: random.Random, vocabulary: int, per_user: int, exponent: float, languages: Sequence[str | None]
) -> tuple[list[str], str | None]:
    """``per_user`` distinct interests ``t<rank>`` drawn by a Zipf-like popularity (without
    replacement), and one of ``languages`` (None: no language), uniformly."""
    ranks = list(range(vocabulary))
    weights = zipf_weights(vocabulary, exponent)
    chosen: list[str] = []
    for _ in range(min(per_user, vocabulary)):
        index = rng.choices(range(len(ranks)), weights)[0]
        chosen.append(f"t{ranks.pop(index)}")
        weights.pop(index)
    language = rng.choice(languages) if languages else None
    return chosen, language


@attrs.define
class Row:
    """One search, as ``SearchUser`` records it (``to_list``/``from_list``: the wire form)."""

    user: str
    interests: list[str]
    language: str | None
    sent: float = 0.0
    joined: float | None = None
    left: float | None = None
    end: str = "open"  # open, match, timeout, cancel, lost
    peer: str | None = None
    role: str | None = None
    match_id: str | None = None
    common: list[str] | None = None
    interests_only: bool = False

    def to_list(self) -> list[Any]:
        return [
            self.user,
            self.interests,
            self.language,
            self.sent,
            self.joined,
            self.left,
            self.end,
            self.peer,
            self.role,
            self.match_id,
            self.common,
            self.interests_only,
        ]

    @classmethod
    def from_list(cls, data: Sequence[Any]) -> Row:
        return cls(*data)


@attrs.frozen
class Rules:
    interest_wait: float
    cooldown: float
    slack: float
    # The server's search timeout, when known: a timed-out search surely left the queue no
    # earlier than ``timeout`` after its request was sent (without it: its reply's arrival
    # minus ``slack``, which a reply delayed longer than ``slack`` would make wrong).
    timeout: float | None = None


Barred = Callable[[str, str], bool]


@attrs.frozen
class _Match:
    early: float  # the match happened after both requests were sent...
    late: float  # ...and before both assign_role arrived
    served: Row
    partner: Row


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


def _shared(a: Row, b: Row) -> int:
    return len(set(a.interests) & set(b.interests))


def _compatible(
    y: Row,
    p: Row,
    match: _Match,
    rules: Rules,
    history: dict[tuple[str, str], list[float]],
    barred: Barred | None,
) -> bool:
    """Surely compatible when ``match`` was made (doubt counts as not compatible)."""
    if y.language is not None and p.language is not None and y.language != p.language:
        return False
    if barred is not None and barred(y.user, p.user):
        return False
    if not _shared(y, p):
        for side in (y, p):
            assert side.joined is not None
            if side.interests and side.interests_only:
                return False
            if side.interests and match.early - side.joined < rules.interest_wait + rules.slack:
                return False
    for before in history.get(_pair(y.user, p.user), []):
        if before < match.late and match.late - before < rules.cooldown + rules.slack:
            return False
    return True


def _matches(rows: Iterable[Row]) -> tuple[list[_Match], int, int, dict[tuple[str, str], float]]:
    """The consistent matches with every time known, how many matchIds were inconsistent,
    how many consistent ones lacked a time (not checked), and each matched row's earliest
    moment of leaving the queue (by (user, matchId))."""
    by_id: dict[str, list[Row]] = {}
    for row in rows:
        if row.end == "match" and row.match_id:
            by_id.setdefault(row.match_id, []).append(row)
    found: list[_Match] = []
    earliest: dict[tuple[str, str], float] = {}
    mismatched = unchecked = 0
    for match_id, pair in by_id.items():
        if len(pair) != 2:
            mismatched += 1
            continue
        a, b = pair
        consistent = (
            a.peer == b.user
            and b.peer == a.user
            and {a.role, b.role} == {"impolite", "polite"}
            and sorted(a.common or []) == sorted(b.common or [])
        )
        if not consistent:
            mismatched += 1
            continue
        served, partner = (a, b) if a.role == "impolite" else (b, a)
        early = max(a.sent, b.sent)
        earliest[(a.user, match_id)] = earliest[(b.user, match_id)] = early
        if served.joined is None or partner.joined is None or served.left is None or partner.left is None:
            unchecked += 1
            continue
        found.append(_Match(early, max(served.left, partner.left), served, partner))
    found.sort(key=lambda match: match.late)
    return found, mismatched, unchecked, earliest


def _left_surely_after(row: Row, earliest: dict[tuple[str, str], float], rules: Rules) -> float:
    """A moment before which ``row`` surely had not left the queue."""
    if row.end == "open":
        return math.inf
    if row.end == "cancel" and row.left is not None:
        return row.left
    if row.end == "timeout" and rules.timeout is not None:
        return row.sent + rules.timeout
    if row.end == "timeout" and row.left is not None:
        return row.left - rules.slack
    if row.end == "match" and row.match_id:
        return earliest.get((row.user, row.match_id), -math.inf)
    return -math.inf  # lost: unknown


def analyse(raw_rows: Iterable[Sequence[Any]], rules: Rules, barred: Barred | None = None) -> dict[str, Any]:
    """The run-wide figures of the search scenario; see the module docstring. ``barred(a,
    b)``: the two may never be matched (blocked either way), when the caller knows blocks."""
    rows = [Row.from_list(raw) for raw in raw_rows]
    matches, mismatched, unchecked, earliest = _matches(rows)
    by_pair: dict[tuple[str, str], list[_Match]] = {}
    for match in matches:
        by_pair.setdefault(_pair(match.served.user, match.partner.user), []).append(match)
    rematches = 0
    for pairs in by_pair.values():
        rematches += sum(1 for x, y in itertools.pairwise(pairs) if y.late - x.early < rules.cooldown)
    # When each pair surely met at the earliest (for the cooldown): every match either side
    # heard of, also one whose other side never heard it (its rows are "mismatched").
    met: dict[tuple[str, str, str], float] = {}  # (pair, matchId) -> after both requests sent
    for row in rows:
        if row.end == "match" and row.peer is not None:
            key = (*_pair(row.user, row.peer), row.match_id or "")
            met[key] = max(met.get(key, row.sent), row.sent)
    history: dict[tuple[str, str], list[float]] = {}
    for (one, other, _), early in met.items():
        history.setdefault((one, other), []).append(early)

    # A sweep over the matches in time order, keeping the searches surely waiting then.
    by_join = sorted((r for r in rows if r.joined is not None), key=lambda r: r.joined or 0.0)
    ends: list[tuple[float, int]] = []  # (surely still queued until, index in by_join), a heap
    waiting: dict[int, Row] = {}
    next_row = 0
    unfair = passed_over = 0
    examples: list[dict[str, Any]] = []
    for match in matches:
        a, b = match.served, match.partner
        while next_row < len(by_join) and (by_join[next_row].joined or 0.0) < b.sent:
            row = by_join[next_row]
            heapq.heappush(ends, (_left_surely_after(row, earliest, rules), next_row))
            waiting[next_row] = row
            next_row += 1
        skipped = []
        for y in waiting.values():
            if y.user in (a.user, b.user) or (y.joined or 0.0) >= b.sent:
                continue
            if _left_surely_after(y, earliest, rules) <= match.late:
                continue
            if ((y.joined or 0.0) < a.sent and _compatible(y, b, match, rules, history, barred)) or (
                _shared(a, y) >= _shared(a, b) and _compatible(y, a, match, rules, history, barred)
            ):
                skipped.append(y.user)
        # Searches that surely ended before this match cannot be waiting for later ones.
        while ends and ends[0][0] <= match.late:
            waiting.pop(heapq.heappop(ends)[1], None)
        if skipped:
            unfair += 1
            passed_over += len(skipped)
            if len(examples) < EXAMPLES:
                examples.append(
                    {"matchId": a.match_id, "served": a.user, "partner": b.user, "passed_over": skipped[:5]}
                )
    return {
        "searches": len(rows),
        "matches": len(matches) + unchecked,
        "mismatched": mismatched,
        "rematches": rematches,
        "unfair": unfair,
        "passed_over": passed_over,
        "fairness_checked": len(matches),
        "unfair_examples": examples,
    }
