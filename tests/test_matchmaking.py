"""The matchmaking rules, as pure functions of the Matchmaker (no I/O)."""

from __future__ import annotations

import random
from collections import Counter

from aleatoria.matchmaking import IMPOLITE, POLITE, RECENT_MATCH_SECONDS, RECENT_MATCHES, Matchmaker


def test_request_matches_a_pooled_user_and_both_leave_the_pool() -> None:
    """A request pairs the requester with a pooled user; both leave the pool."""
    mm = Matchmaker()
    for user in ("a", "b"):
        mm.set_available(user)
    outcome = mm.request_peer("a")
    assert ("b", IMPOLITE, False) == (outcome.peer, outcome.role, outcome.resend)
    assert [] == mm.pool()
    assert "a" == mm.peer_of("b")


def test_nobody_suitable_gives_no_peer() -> None:
    """Only the requester (or only the current peer) in the pool: no peer."""
    mm = Matchmaker()
    mm.set_available("a")
    assert mm.request_peer("a").no_peer
    mm.set_available("c")
    assert mm.request_peer("a", current_peer="c").no_peer


def test_requester_in_a_match_gets_its_assignment_again() -> None:
    """A request that does not name the current peer creates no second match."""
    mm = Matchmaker()
    for user in ("a", "b", "c"):
        mm.set_available(user)
    first = mm.request_peer("a")
    assert first.peer is not None
    mm.set_available("d")
    again = mm.request_peer(first.peer)
    assert ("a", POLITE, True) == (again.peer, again.role, again.resend)
    assert 1 == mm.matches()


def test_a_resend_carries_the_match_id_and_common_interests() -> None:
    """The interests a live match was made on are kept with it: a resend carries them (and
    its id) to either side; they go with the match."""
    mm = Matchmaker()
    mm.set_available("b")
    made = mm.request_peer("a")
    mm.share("a", "b", ("chess",))
    mm.share("a", "c", ("go",))  # not a's match: ignored
    for user, peer, role in (("a", "b", IMPOLITE), ("b", "a", POLITE)):
        again = mm.request_peer(user)
        assert (peer, role, True, made.match_id, ("chess",)) == (
            again.peer,
            again.role,
            again.resend,
            again.match_id,
            again.common,
        )
    assert mm.hangup("b", "a")
    assert ((), (), "") == (mm.common("a"), mm.common("b"), mm.match_id("a"))


def test_match_between_gives_the_live_or_a_recent_ended_match() -> None:
    """For reports: the live match's id, else the most recent of a user's last
    RECENT_MATCHES ended matches with that user that ended within RECENT_MATCH_SECONDS,
    else ''. Each side keeps its own record; a user's goes when it disconnects."""
    now = [0.0]
    mm = Matchmaker(clock=lambda: now[0])
    ids: dict[str, str] = {}
    peers = [f"p{i}" for i in range(RECENT_MATCHES + 2)]
    for peer in peers:
        mm.set_available(peer)
        ids[peer] = mm.request_peer("a").match_id
        assert ids[peer] == mm.match_between("a", peer) == mm.match_between(peer, "a")
        assert "" == mm.match_between("a", "nobody")
        assert mm.hangup(peer, "a")
    forgotten, kept = peers[:2], peers[2:]
    assert ["", ""] == [mm.match_between("a", peer) for peer in forgotten]
    assert [ids[peer] for peer in kept] == [mm.match_between("a", peer) for peer in kept]
    assert ids["p0"] == mm.match_between("p0", "a")  # p0's own record
    # The same two again: the most recent match.
    mm.set_available("p9")
    again = mm.request_peer("a", "p8").match_id
    assert again != ids["p9"]
    assert "p9" == mm.set_available("a")
    assert again == mm.match_between("p9", "a") == mm.match_between("a", "p9")
    now[0] = RECENT_MATCH_SECONDS - 1
    assert again == mm.match_between("a", "p9")
    now[0] = RECENT_MATCH_SECONDS
    assert "" == mm.match_between("a", "p9")
    now[0] = 0.0
    mm.disconnect("a")
    assert ("", again) == (mm.match_between("a", "p9"), mm.match_between("p9", "a"))


def test_next_ends_the_match_and_excludes_the_old_peer() -> None:
    """'Next' (currentPeerId = current peer) ends the match and never re-picks that peer."""
    mm = Matchmaker()
    mm.set_available("b")
    assert "b" == mm.request_peer("a").peer
    mm.set_available("c")
    outcome = mm.request_peer("a", current_peer="b")
    assert ("c", "b") == (outcome.peer, outcome.ended_peer)
    assert mm.peer_of("b") is None


def test_availability_and_disconnect_end_matches() -> None:
    """Re-declaring availability or disconnecting ends the match and reports the peer left."""
    mm = Matchmaker()
    mm.set_available("b")
    mm.request_peer("a")
    assert "b" == mm.set_available("a")
    assert ["a"] == mm.pool()
    mm.set_available("c")
    mm.request_peer("a")
    assert "a" == mm.disconnect("c")
    assert mm.peer_of("a") is None


def test_hangup_ends_only_the_live_match() -> None:
    """Hangup to someone who is not the current peer changes nothing."""
    mm = Matchmaker()
    mm.set_available("b")
    mm.request_peer("a")
    assert not mm.hangup("a", "z")
    assert mm.hangup("b", "a")
    assert 0 == mm.matches()


def test_pick_is_uniform_over_allowed_users() -> None:
    """Every allowed pooled user is picked about equally often; excluded ones never."""
    rng = random.Random(7)
    seen: Counter[str] = Counter()
    for _ in range(6000):
        mm = Matchmaker(rng)
        for user in ("a", "b", "c", "d", "e"):
            mm.set_available(user)
        outcome = mm.request_peer("a", current_peer="c")
        assert outcome.peer is not None
        seen[outcome.peer] += 1
    assert {"b", "d", "e"} == set(seen)
    for count in seen.values():
        assert 1800 < count < 2200


class _OneSided:
    """A filter that knows each block only from the blocked user's side, and shadow bans
    that may begin after a user was pooled (as the Redis store's while degraded)."""

    def __init__(self) -> None:
        self.blocked_by: dict[str, set[str]] = {}
        self.shadow: set[str] = set()

    def barred(self, user: str) -> set[str] | None:
        return self.blocked_by.get(user)

    def shadowed(self, user: str) -> bool:
        return user in self.shadow


def test_the_picked_side_is_asked_too() -> None:
    """A block the requester made, known only as the picked user's ``barred``, and a shadow
    ban that began after the pick's user was pooled, both keep the pair apart."""
    one_sided = _OneSided()
    for seed in range(20):
        mm = Matchmaker(random.Random(seed), one_sided)
        one_sided.blocked_by = {"b": {"a"}}
        one_sided.shadow = set()
        for user in ("b", "m", "c"):
            mm.set_available(user)
        one_sided.shadow = {"m"}  # pooled as a normal user
        assert "c" == mm.request_peer("a").peer
        assert mm.request_peer("x").peer == "b"
        one_sided.shadow.add("e")
        assert mm.request_peer("e").no_peer  # m was pooled on the other side: missed, not wrong
