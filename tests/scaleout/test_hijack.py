"""Calls are not hijacked across instances (PROTOCOL.md section 16): while alice (instance A)
and bob (instance B) are in a live match, carol on a third instance cannot signal into it --
her instance knows nothing of the match, so the Redis route refuses -- and the call goes on."""

from __future__ import annotations

from redis_server import RedisServer
from scaleout_support import instances
from support import connect


async def test_signaling_into_a_call_on_other_instances_is_refused(redis_server: RedisServer) -> None:
    async with (
        instances(redis_server.url, 3) as (port_a, port_b, port_c),
        connect(port_a, "alice", skip=True) as alice,
        connect(port_b, "bob", skip=True) as bob,
        connect(port_c, "carol", skip=True) as carol,
    ):
        await bob.send({"type": "user_available_webrtc"})
        await bob.sync()
        assigned = await alice.request({"type": "request_random_peer"}, "assign_role", skip=True)
        assert "bob" == assigned["payload"]["peerId"]
        await bob.expect("assign_role", skip=True)
        for target in ("alice", "bob"):
            for kind in ("webrtc_offer", "webrtc_candidate", "hangup"):
                reply = await carol.request(
                    {"type": kind, "toUser": target, "payload": {"x": 1}}, "error", skip=True
                )
                assert "peer_unavailable" == reply["payload"]["code"], (target, kind)
        await alice.send({"type": "webrtc_offer", "toUser": "bob", "payload": {"sdp": "from alice"}})
        offer = await bob.expect("webrtc_offer", skip=True)
        assert ("alice", {"sdp": "from alice"}) == (offer["fromUser"], offer["payload"])
        await bob.send({"type": "hangup", "toUser": "alice", "payload": {}})
        await alice.expect("hangup", skip=True)
        # The call is over: carol reaches them again.
        await carol.send({"type": "webrtc_offer", "toUser": "alice", "payload": {"sdp": "from carol"}})
        assert "carol" == (await alice.expect("webrtc_offer", skip=True))["fromUser"]
