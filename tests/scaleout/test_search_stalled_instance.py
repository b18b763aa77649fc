"""A searcher whose instance stalls long enough to be declared dead keeps its place in the
search queue (PROTOCOL.md section 12: it stays there until matched, cancelled, gone or timed
out). Found by the 3-instance storm under the whole suite's load: the tick dropped such
searchers silently, and the users of the live instance waited forever.

Two real server processes share one redis-server. Alice searches on A; A is frozen
(SIGSTOP) past the presence TTL, so B declares it dead and reaps it, and B's ticks look at
Alice (she falls due as her interest wait ends) while her instance is not alive. A is thawed,
notices it was declared dead and re-registers. Bob then searches on B: he must get Alice."""

from __future__ import annotations

import signal

import pytest
import trio
from redis_server import RedisServer
from scaleout_support import serve_process, wait_until
from support import connect

from aleatoria.store.redis_scripts import DUE_KEY, QUEUE_KEY

pytestmark = pytest.mark.slow

FLAGS = (
    "--presence-ttl",
    "1.5",
    "--heartbeat-interval",
    "0.3",
    # Alice falls due (her interest wait ends) after her instance stops counting as alive
    # (1.5 s after it freezes) and before it is thawed.
    "--interest-wait",
    "3",
    "--search-tick",
    "0.1",
    "--search-timeout",
    "60",
    "--allowed-origin",
    "*",
    "--log-level",
    "info",
)


async def test_a_searcher_on_a_stalled_instance_keeps_its_place(redis_server: RedisServer) -> None:
    flags = (*FLAGS, "--redis-url", redis_server.url)
    r = redis_server.client()
    async with (
        serve_process(*flags) as a,
        serve_process(*flags) as b,
        connect(a.port, "alice", skip=True) as alice,
        connect(b.port, "bob", skip=True) as bob,
    ):
        search = {"type": "request_random_peer", "payload": {"wait": True, "interests": ["chess"]}}
        await alice.request(search, "searching", skip=True)
        since = r.zscore(QUEUE_KEY, "alice")
        assert since is not None
        a.process.send_signal(signal.SIGSTOP)
        try:
            with trio.fail_after(20):
                await b.wait_for_log(lambda log: "event=instances_reaped" in log)

            # A tick has looked at Alice once her interest wait ended (her instance not alive
            # by then): she is gone from the queue (the defect) or due again later.
            def looked_at() -> bool:
                due = r.zscore(DUE_KEY, "alice")
                return due is None or due > since + 3000

            await wait_until(looked_at, timeout=15)
            assert r.zscore(QUEUE_KEY, "alice") == since, "alice lost her place in the queue"
        finally:
            a.process.send_signal(signal.SIGCONT)
        with trio.fail_after(20):
            await a.wait_for_log(lambda log: "event=instance_was_declared_dead" in log)
            await a.wait_for_log(lambda log: "event=redis_recovered" in log or "users_resynced" in log)
        bob_match = await bob.request(
            {"type": "request_random_peer", "payload": {"wait": True, "interests": ["chess"]}},
            "assign_role",
            skip=True,
        )
        alice_match = await alice.expect("assign_role", skip=True)
        assert bob_match["payload"]["peerId"] == "alice"
        assert alice_match["payload"]["peerId"] == "bob"
        assert bob_match["payload"]["matchId"] == alice_match["payload"]["matchId"]
        assert bob_match["payload"]["commonInterests"] == ["chess"]
