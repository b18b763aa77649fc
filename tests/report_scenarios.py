"""What a report records as its match (PROTOCOL.md section 13: "the match (given, current or
most recent between them)"), as one scenario run on the in-memory tier (``test_safety.py``)
and on Redis with two servers sharing it (``redis/test_redis_safety.py``: the two sides of a
match on different instances).

The scenario takes ``opened(user)`` (an async context manager giving a connected peer with
the ``support.Peer`` API) and ``reports()`` (the stored reports, newest first)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from support import Peer

Opener = Callable[[str], AbstractAsyncContextManager[Peer]]
Reports = Callable[[], Awaitable[list[dict[str, Any]]]]


async def _pooled(peer: Peer) -> None:
    await peer.send({"type": "user_available_webrtc"})
    await peer.request({"type": "ping"}, "pong")


async def _matched(requester: Peer, pooled: Peer, current: str | None = None) -> str:
    """``pooled`` pools itself, ``requester`` asks for a peer (``current``: "next" from it);
    both are told; the match's id."""
    await _pooled(pooled)
    payload = {} if current is None else {"currentPeerId": current}
    mine = (await requester.request({"type": "request_random_peer", "payload": payload}, "assign_role"))[
        "payload"
    ]
    theirs = (await pooled.expect("assign_role"))["payload"]
    assert (pooled.user, requester.user) == (mine["peerId"], theirs["peerId"])
    assert mine["matchId"] == theirs["matchId"]
    return str(mine["matchId"])


async def _report(reporter: Peer, reported: str, match_id: str | None = None) -> None:
    payload = {"user": reported, "reason": "harassment"}
    if match_id is not None:
        payload["matchId"] = match_id
    await reporter.request({"type": "report_user", "payload": payload}, "report_received")


async def the_match_a_report_records(opened: Opener, reports: Reports) -> None:
    """A report without a ``matchId`` records the match between reporter and reported user:
    the live one, else the most recent that ended -- by either side's ``hangup`` or "next",
    told to either side -- else none when the two never met. A given ``matchId`` is recorded
    as given."""
    async with (
        opened("alice") as alice,
        opened("bob") as bob,
        opened("carol") as carol,
        opened("dave") as dave,
    ):
        hung_up = await _matched(alice, bob)
        await alice.send({"type": "hangup", "toUser": "bob", "payload": {}})
        assert "alice" == (await bob.expect("hangup"))["fromUser"]
        skipped = await _matched(alice, carol)
        live = await _matched(alice, dave, current="carol")  # "next": carol is told
        assert {"reason": "peer_left"} == (await carol.expect("hangup"))["payload"]
        assert len({hung_up, skipped, live}) == 3
        await _report(alice, "carol")  # right after its "next"
        await _report(alice, "bob", "m-given")
        await _report(bob, "alice")  # right after alice's hangup
        await _report(carol, "alice")  # right after alice's "next"
        await _report(dave, "bob")  # never met
        await _report(dave, "alice")  # live: the report's block ends it
        assert {"reason": "peer_left"} == (await alice.expect("hangup"))["payload"]
        await _report(alice, "dave")  # right after that
    recorded = {(r["reporter"], r["reported"]): r["match"] for r in await reports()}
    assert {
        ("alice", "carol"): {"matchId": skipped, "peer": "carol", "current": False},
        ("alice", "bob"): {"matchId": "m-given", "peer": "bob", "current": False},
        ("bob", "alice"): {"matchId": hung_up, "peer": "alice", "current": False},
        ("carol", "alice"): {"matchId": skipped, "peer": "alice", "current": False},
        ("dave", "bob"): {"matchId": None, "peer": "bob", "current": False},
        ("dave", "alice"): {"matchId": live, "peer": "alice", "current": True},
        ("alice", "dave"): {"matchId": live, "peer": "dave", "current": False},
    } == recorded
