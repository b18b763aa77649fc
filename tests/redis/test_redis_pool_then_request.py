"""With Redis, a ``user_available_webrtc`` that arrives with a ``request_random_peer`` right
behind it (one read) runs as one store step, so no other requester takes the user from the
pool in between (its request would only get its assignment again: a crossed request).
The replies are the same as for two separate steps; a held ``user_available_webrtc``
followed by anything else, or by nothing, still pools the user first."""

from __future__ import annotations

from rawws import open_raw_ws, text
from redis_server import RedisServer
from redis_support import server_config
from support import connect, running_server


async def test_pool_and_request_in_one_read(redis_server: RedisServer) -> None:
    async with (
        running_server(server_config(redis_server.url)) as srv,
        connect(srv, "alice", skip=True) as alice,
        open_raw_ws(srv, "bob") as bob,
    ):
        await alice.send({"type": "user_available_webrtc"})
        await alice.sync()
        await bob.send(text({"type": "user_available_webrtc"}) + text({"type": "request_random_peer"}))
        assigned = await bob.expect("assign_role")
        assert {"role": "impolite", "peerId": "alice"} == {
            k: assigned["payload"][k] for k in ("role", "peerId")
        }
        assert "bob" == (await alice.expect("assign_role", skip=True))["payload"]["peerId"]
        # "Next" in the same way: pooling ends the match (alice hears peer_left), then
        # the request finds nobody else.
        await bob.send(text({"type": "user_available_webrtc"}) + text({"type": "request_random_peer"}))
        assert "no_peer_available" == (await bob.expect("no_peer_available"))["type"]
        assert {"reason": "peer_left"} == (await alice.expect("hangup", skip=True))["payload"]


async def test_a_held_available_still_pools(redis_server: RedisServer) -> None:
    async with running_server(server_config(redis_server.url)) as srv:
        async with connect(srv, "alice", skip=True) as alice, open_raw_ws(srv, "bob") as bob:
            # Alone in its read: pooled when the read is done.
            await bob.send(text({"type": "user_available_webrtc"}))
            await bob.send(text({"type": "ping"}))
            await bob.expect("pong")
            assert (
                "bob"
                == (await alice.request({"type": "request_random_peer"}, "assign_role", skip=True))[
                    "payload"
                ]["peerId"]
            )
            await bob.expect("assign_role")
        async with connect(srv, "carol", skip=True) as carol, open_raw_ws(srv, "dave") as dave:
            # Followed by something else in the same read: pooled first, then that.
            await dave.send(text({"type": "user_available_webrtc"}) + text({"type": "ping"}))
            await dave.expect("pong")
            assert (
                "dave"
                == (await carol.request({"type": "request_random_peer"}, "assign_role", skip=True))[
                    "payload"
                ]["peerId"]
            )
