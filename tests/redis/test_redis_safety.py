"""Safety in Redis (PROTOCOL.md section 13): blocks, bans and reports live in Redis and
survive a server restart; the Redis pick keeps blocked pairs and shadow-banned users apart;
reports are a capped stream, read newest first with paging; while Redis is down the store
answers from memory, and matching (in memory then) still keeps apart the users whose blocks
and shadow bans were made before the outage."""

from __future__ import annotations

import time
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import trio
from health import wait_for_health
from redis_server import RedisServer
from redis_support import server_config, wait_until
from report_scenarios import the_evidence_a_report_reads, the_match_a_report_records
from support import Peer, connect, running_server

from aleatoria.safety import Ban
from aleatoria.store.redis import open_redis_store


async def test_blocks_and_bans_survive_a_restart(redis_server: RedisServer) -> None:
    config = server_config(redis_server.url, admin_token="t")
    async with running_server(config) as srv, connect(srv, "alice", skip=True) as alice:
        await alice.request({"type": "block_user", "payload": {"user": "bob"}}, "user_blocked", skip=True)
    async with open_redis_store(config, redis_server.url) as store:
        await store.safety.ban(Ban("carol", None, "spam", created=time.time()))
    # A new server process on the same Redis (the first one is gone).
    async with running_server(config) as srv:
        async with connect(srv, "bob", skip=True) as bob:
            await bob.send({"type": "chat_message", "toUser": "alice", "payload": {"content": "hi"}})
            assert "peer_unavailable" == (await bob.expect("error", skip=True))["payload"]["code"]
        async with connect(srv, "alice", skip=True) as alice:
            assert {"users": ["bob"]} == (
                await alice.request({"type": "get_blocked"}, "blocked_users", skip=True)
            )["payload"]
        async with httpx.AsyncClient() as http:
            upgrade = {
                "connection": "upgrade",
                "upgrade": "websocket",
                "sec-websocket-version": "13",
                "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
            }
            refused = await http.get(f"http://127.0.0.1:{srv.port}/ws?userId=carol", headers=upgrade)
            assert (403, "banned\n") == (refused.status_code, refused.text)


async def test_report_records_the_match_between_the_two(redis_server: RedisServer) -> None:
    """``report_scenarios.the_match_a_report_records`` on two servers sharing one Redis:
    alice and dave on one, bob and carol on the other (their matches with alice cross
    instances; the record of a match that ended is kept in Redis, beside the match ids)."""
    config = server_config(redis_server.url)
    async with running_server(config) as one, running_server(config) as two:
        where = {"alice": one, "dave": one, "bob": two, "carol": two}

        def opened(user: str) -> AbstractAsyncContextManager[Peer]:
            return connect(where[user], user)

        async def reports() -> list[dict[str, Any]]:
            async with open_redis_store(config, redis_server.url) as store:
                return await store.safety.reports(50)

        await the_match_a_report_records(opened, reports)


async def test_report_reads_its_evidence_within_a_budget(redis_server: RedisServer) -> None:
    """``report_scenarios.the_evidence_a_report_reads`` on Redis, the bytes read counted by
    redis-server (``total_net_output_bytes``: what it wrote to its clients)."""
    budget = 64 * 1024
    config = server_config(redis_server.url, outbox_bytes=budget)
    with redis_server.client() as r:

        def read_bytes() -> int:
            return int(r.info("stats")["total_net_output_bytes"])

        async def settled(counts: dict[str, int]) -> None:
            await wait_until(lambda: all(r.zcard(f"room:messages:{k}") == n for k, n in counts.items()))

        async with running_server(config) as srv:

            def opened(user: str) -> AbstractAsyncContextManager[Peer]:
                return connect(srv, user, max_message_size=4 * budget)

            async def reports() -> list[dict[str, Any]]:
                async with open_redis_store(config, redis_server.url) as store:
                    return await store.safety.reports(50)

            await the_evidence_a_report_reads(opened, reports, read_bytes, settled, budget)


async def test_redis_pick_respects_blocks_and_shadow_bans(redis_server: RedisServer) -> None:
    url = redis_server.url
    async with open_redis_store(server_config(url), url) as store:
        for user in ("alice", "bob", "mallory", "eve"):
            await store.connect(user, f"c-{user}")
        assert await store.safety.block("alice", "bob")
        await store.set_available("bob")
        assert (await store.request_peer("alice", None)).no_peer  # alice blocked bob
        await store.set_available("alice")
        assert (await store.request_peer("bob", None)).no_peer  # and the other way round
        await store.safety.unblock("alice", "bob")
        assert "alice" == (await store.request_peer("bob", None)).peer
        # Shadow bans: apart from everyone else, together with each other.
        now = time.time()
        await store.safety.ban(Ban("mallory", None, shadow=True, created=now))
        await store.safety.ban(Ban("eve", now + 60, shadow=True, created=now))
        await store.set_available("mallory")
        await store.hangup("alice", "bob")
        await store.hangup("bob", "alice")
        assert (await store.request_peer("alice", None)).no_peer
        assert "mallory" == (await store.request_peer("eve", None)).peer
        # A shadow ban that ended no longer separates (its end is the caller's clock).
        await store.safety.ban(Ban("eve", now - 1, shadow=True, created=now - 61))
        await store.hangup("eve", "mallory")
        await store.set_available("eve")
        assert "eve" == (await store.request_peer("alice", None)).peer


async def test_reports_stream_newest_first_with_paging(redis_server: RedisServer) -> None:
    url = redis_server.url
    async with open_redis_store(server_config(url, report_cap=50), url) as store:
        ids = []
        for i in range(120):
            report_id, count = await store.safety.add_report(
                {"reporter": f"r{i % 3}", "reported": "bob" if i % 2 else "zed", "n": i}, time.time()
            )
            ids.append(report_id)
        assert 3 == count  # distinct reporters of zed within the hour
        newest = await store.safety.reports(10)
        assert [119 - i for i in range(10)] == [r["n"] for r in newest]
        assert ids[-1] == newest[0]["id"]
        page = await store.safety.reports(5, after=newest[-1]["id"])
        assert [109 - i for i in range(5)] == [r["n"] for r in page]
        about_bob = await store.safety.reports(4, user="bob")
        assert [119, 117, 115, 113] == [r["n"] for r in about_bob]
        # Capped at report_cap: the newest are kept.
        kept = await store.safety.reports(200)
        assert [119 - i for i in range(50)] == [r["n"] for r in kept]


async def test_safety_answers_from_memory_while_redis_is_down(redis_down: RedisServer) -> None:
    url = redis_down.url
    async with open_redis_store(server_config(url, redis_connect_timeout=0.2), url) as store:
        assert "degraded" == store.health()
        assert await store.safety.block("alice", "bob")
        assert ["bob"] == await store.safety.blocked("alice")
        admission = await store.safety.admit("bob", time.time())
        assert frozenset({"alice"}) == admission.blocked_by
        report_id, _ = await store.safety.add_report({"reporter": "alice", "reported": "bob"}, time.time())
        assert [report_id] == [r["id"] for r in await store.safety.reports(5)]
        with trio.fail_after(5):
            await store.safety.ban(Ban("bob", None, created=time.time()))
        assert (await store.safety.admit("bob", time.time())).refused


async def test_matching_while_degraded_keeps_blocks_and_shadow_bans(redis_server: RedisServer) -> None:
    """Made in Redis before the outage, known to the connections: while Redis is down the
    instance matches its users in memory and must still keep them apart."""
    config = server_config(redis_server.url)
    async with open_redis_store(config, redis_server.url) as store:
        now = time.time()
        await store.safety.ban(Ban("mallory", None, shadow=True, created=now))
        await store.safety.ban(Ban("eve", None, shadow=True, created=now))
        assert await store.safety.block("alice", "bob")
    async with (
        running_server(config) as srv,
        connect(srv, "alice", skip=True) as alice,
        connect(srv, "bob", skip=True) as bob,
        connect(srv, "mallory", skip=True) as mallory,
        connect(srv, "eve", skip=True) as eve,
        connect(srv, "carol", skip=True) as carol,
    ):
        redis_server.kill9()
        await wait_for_health(srv, "degraded")
        no_peer = {"type": "request_random_peer"}
        await alice.send({"type": "user_available_webrtc"})
        await alice.sync()
        await mallory.request(no_peer, "no_peer_available", skip=True)  # shadow-banned
        await bob.request(no_peer, "no_peer_available", skip=True)  # alice blocked him
        await mallory.send({"type": "user_available_webrtc"})
        await mallory.sync()
        await bob.request(no_peer, "no_peer_available", skip=True)  # nor mallory
        got = await eve.request(no_peer, "assign_role", skip=True)
        assert "mallory" == got["payload"]["peerId"]  # shadow-banned together
        got = await carol.request(no_peer, "assign_role", skip=True)
        assert "alice" == got["payload"]["peerId"]
