"""What a report records as its match (PROTOCOL.md section 13: "the match (given, current or
most recent between them)"), and what it reads for its evidence, as scenarios run on the
in-memory tier (``test_safety.py``) and on Redis (``redis/test_redis_safety.py``: for the
match, with two servers sharing it, the two sides of a match on different instances).

The scenarios take ``opened(user)`` (an async context manager giving a connected peer with
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


Settled = Callable[[dict[str, int]], Awaitable[None]]

# A room message of about 30 KB (a payload may take ALEATORIA_MAX_PAYLOAD_BYTES, 32,768).
_PAD = "x" * 30_000
_BIG = 31_000  # such a message as stored, and then some


async def _say(peer: Peer, room: str, payload: dict[str, Any]) -> None:
    """``peer`` writes in ``room`` (joined) and waits for its own copy."""
    await peer.send({"type": "chat_message", "room": room, "payload": payload})
    while True:
        message = await peer.expect("chat_message", skip=True)
        if (peer.user, payload) == (message["fromUser"], message["payload"]):
            return


async def _in(peer: Peer, action: str, rooms: list[str]) -> None:
    """``peer`` joins or leaves ``rooms``."""
    reply = {"join": "room_joined", "leave": "room_left"}[action]
    for room in rooms:
        await peer.request({"type": f"{action}_room", "room": room}, reply, skip=True)


async def _said_alone(peer: Peer, room: str, text: str) -> None:
    """``peer`` joins ``room``, writes ``text`` there and leaves (so it is sent no one else's
    message)."""
    await _in(peer, "join", [room])
    await _say(peer, room, {"content": text})
    await _in(peer, "leave", [room])


def _contents(messages: list[Any]) -> list[str]:
    return [str(message["payload"]["content"]) for message in messages]


async def the_evidence_a_report_reads(
    opened: Opener, reports: Reports, read_bytes: Callable[[], int], settled: Settled, budget: int
) -> None:
    """A report's evidence reads the reporter's rooms newest first, each up to an even share
    of ``budget`` (the server's ALEATORIA_OUTBOX_BYTES) and one message more: in rooms of
    ordinary messages it finds the reported user's message behind 99 others; in rooms of
    30 KB messages it finds the reported user's newest, reads (``read_bytes``: the store's
    count, before and after the report) under ``budget`` plus one large message per room,
    not their 2.7 MB, and misses what the user wrote before them. ``settled``: wait until
    the store holds that many messages in each room."""
    small, big = ["S0", "S1"], ["B0", "B1", "B2", "B3"]
    async with opened("alice") as alice, opened("bob") as bob, opened("carol") as carol:
        await _in(carol, "join", small + big)
        for room in small:
            await _said_alone(bob, room, f"bob in {room}")
            for i in range(99):
                await _say(carol, room, {"content": f"carol {i}"})
        for room in big:
            await _said_alone(bob, room, f"bob before {room}")
            for i in range(20):
                await _say(carol, room, {"content": str(i), "pad": _PAD})
            await _said_alone(bob, room, f"bob in {room}")
        await settled({**dict.fromkeys(small, 100), **dict.fromkeys(big, 22)})
        # alice joins once the rooms are full: she is sent none of it.
        await _in(alice, "join", small)
        await _report(alice, "bob")
        await _in(alice, "leave", small)
        await _in(alice, "join", big)
        before = read_bytes()
        await _report(alice, "bob")
        read = read_bytes() - before
    rooms = len(big) + 1  # and the room alice connected to
    assert read < budget + rooms * _BIG, read
    latest, first = (await reports())[:2]
    assert ["bob in S0", "bob in S1"] == _contents(first["evidence"]["roomMessages"])
    assert [f"bob in {room}" for room in big] == _contents(latest["evidence"]["roomMessages"])
