"""Redis failing under two instances: each keeps serving its own users (cross-instance delivery
pauses), and once Redis is back no user is in two matches and everyone whose match did not
survive is told."""

from __future__ import annotations

import pytest
from health import wait_for_health
from redis_server import RedisServer
from scaleout_support import instances, wait_until
from support import connect

MATCHES = "webrtc:matches:{available:webrtc}"


@pytest.mark.parametrize("failure", ["restart", "freeze"])
async def test_outage_never_leaves_a_user_in_two_matches(redis_server: RedisServer, failure: str) -> None:
    """alice (instance 1) and bob (instance 2) are matched. Redis fails (killed and restarted
    empty, or frozen then thawed). Meanwhile bob moves on to dave ("next", decided by instance
    2 alone); alice's instance cannot know. Once Redis is back: bob-dave is the match, alice's
    match with bob is gone and alice was told (hangup from bob), and cross-instance delivery
    works again."""
    async with (
        instances(redis_server.url, 2, redis_call_timeout=0.5) as (one, two),
        connect(one, "alice", "Den", skip=True) as alice,
        connect(one, "carol", "Den", skip=True) as carol,
        connect(two, "bob", "Den", skip=True) as bob,
        connect(two, "dave", skip=True) as dave,
    ):
        await bob.send({"type": "user_available_webrtc"})
        await bob.sync()
        assert (
            "bob"
            == (await alice.request({"type": "request_random_peer"}, "assign_role", skip=True))["payload"][
                "peerId"
            ]
        )
        await bob.expect("assign_role", skip=True)
        await dave.send({"type": "user_available_webrtc"})
        await dave.sync()

        if failure == "restart":
            redis_server.kill9()
        else:
            redis_server.freeze()
        for port in (one, two):
            await wait_for_health(port, "degraded", "down")

        # Each instance serves its own users: bob moves on to dave (both on instance 2).
        moved = await bob.request(
            {"type": "request_random_peer", "payload": {"currentPeerId": "alice"}}, "assign_role", skip=True
        )
        assert ("impolite", "dave") == (moved["payload"]["role"], moved["payload"]["peerId"])
        assert "bob" == (await dave.expect("assign_role", skip=True))["payload"]["peerId"]
        # Room chat is local only meanwhile.
        await alice.send({"type": "chat_message", "room": "Den", "payload": {"content": "outage"}})
        assert "outage" == (await carol.expect("chat_message", skip=True))["payload"]["content"]

        if failure == "restart":
            await redis_server.restart()
        else:
            redis_server.thaw()
        for port in (one, two):
            await wait_for_health(port, "ok", "ok")

        # alice is told her match with bob is over (it did not survive the outage).
        hangup = await alice.expect("hangup", skip=True)
        assert ("bob", {"reason": "peer_left"}) == (hangup["fromUser"], hangup["payload"])
        with redis_server.client() as r:
            await wait_until(lambda: {b"bob": b"dave|impolite", b"dave": b"bob|polite"} == r.hgetall(MATCHES))
        # alice is in no match: she can be matched again, with carol.
        await carol.send({"type": "user_available_webrtc"})
        await carol.sync()
        again = await alice.request({"type": "request_random_peer"}, "assign_role", skip=True)
        assert "carol" == again["payload"]["peerId"]
        # Cross-instance delivery is back.
        await alice.send({"type": "chat_message", "room": "Den", "payload": {"content": "back"}})
        assert "back" == (await bob.expect("chat_message", skip=True))["payload"]["content"]
        assert "back" == (await alice.expect("chat_message", skip=True))["payload"]["content"]
        await bob.send({"type": "chat_message", "toUser": "alice", "payload": {"content": "dm"}})
        assert "dm" == (await alice.expect("chat_message", skip=True))["payload"]["content"]
