"""``block_user`` crossing a match made on another instance (PROTOCOL.md section 13): A, pooled
on one ``aleatoria serve`` process, blocks B in the same moment as B, on another, asks for a
random peer and gets A. Whichever comes first in Redis, the two do not stay matched: B is
either not matched with A or hears ``hangup`` ``peer_left`` from A, and A, told
``user_blocked``, is not handed the match afterwards. A's instance used to end a live match
on a block only if it had heard of it already: with the ``assign_role`` still on its way, the
pair stayed in a live match in Redis, B never told, and A got ``assign_role`` with the user it
had just blocked (9 trials in 30 in a red-team run)."""

from __future__ import annotations

from typing import Any

import orjson
import trio
from redis_server import RedisServer
from scaleout_support import redis_client, serve_process
from support import SocketPeer, connect

from aleatoria.store.redis_scripts import MATCHES_KEY

TRIALS = 30


async def _until(client: SocketPeer, seen: list[dict[str, Any]], done: Any) -> None:
    """Read ``client`` into ``seen`` until ``done(message)``."""
    while True:
        message = orjson.loads(await client.ws.get_message())
        seen.append(message)
        if done(message):
            return


async def _trial(port_a: int, port_b: int, url: str, n: int) -> list[str]:
    """One race; what went wrong in it (empty: nothing)."""
    a, b, c = f"a{n}", f"b{n}", f"c{n}"
    wrong = []
    async with (
        connect(port_a, a, skip=True) as client_a,
        connect(port_b, b, skip=True) as client_b,
        connect(port_b, c, skip=True) as client_c,
    ):
        await client_a.send({"type": "user_available_webrtc"})
        await client_a.sync()  # pooled by now
        seen_a: list[dict[str, Any]] = []
        seen_b: list[dict[str, Any]] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client_b.send, {"type": "request_random_peer"})
                nursery.start_soon(client_a.send, {"type": "block_user", "payload": {"user": b}})
            await _until(client_a, seen_a, lambda m: m["type"] == "user_blocked")
            await _until(client_b, seen_b, lambda m: m["type"] in ("assign_role", "no_peer_available"))
            told = False
            if seen_b[-1]["type"] == "assign_role":
                assert a == seen_b[-1]["payload"]["peerId"]
                with trio.move_on_after(3):
                    hangup = await client_b.expect("hangup", skip=True)
                    assert (a, "peer_left") == (hangup["fromUser"], hangup["payload"]["reason"])
                    told = True
                if not told:
                    wrong.append(f"{b} matched with {a}, who blocked it, and never told it ended")
            # Whatever B's instance sent A (an assignment) is before a DM C sends A afterwards
            # from the same instance: A's messages up to that DM tell the whole story.
            await client_c.send({"type": "chat_message", "toUser": a, "payload": {"content": "mark"}})
            await _until(client_a, seen_a, lambda m: m["type"] == "chat_message")
        kinds = [m["type"] for m in seen_a]
        if "assign_role" in kinds[kinds.index("user_blocked") :]:
            wrong.append(f"{a} handed a match with {b} after blocking it: {kinds}")
        with redis_client(url) as r:
            if r.hget(MATCHES_KEY, a) or r.hget(MATCHES_KEY, b):
                wrong.append(f"{a} and {b} still matched in Redis")
    return wrong


async def test_a_block_crossing_a_match_ends_it(redis_server: RedisServer) -> None:
    """Repeated races between A's block and B's request, A and B on two processes: no trial
    leaves them matched, in Redis or in what either side was told."""
    url = redis_server.url
    async with serve_process("--redis-url", url) as one, serve_process("--redis-url", url) as two:
        wrong: list[str] = []
        for n in range(TRIALS):
            wrong += await _trial(one.port, two.port, url, n)
        assert [] == wrong
