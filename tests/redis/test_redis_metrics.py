"""The Redis store's figures on /metrics, with a real redis-server."""

from __future__ import annotations

import trio
from prometheus_client.parser import text_string_to_metric_families
from redis_server import RedisServer
from redis_support import server_config
from support import connect, running_server


async def scrape(port: int) -> dict[str, float]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    body = data.split(b"\r\n\r\n", 1)[1].decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if not sample.labels or sample.labels.get("le") == "+Inf"
    }


async def test_redis_call_latency_histogram_moves(redis_server: RedisServer) -> None:
    """Redis calls are counted in a latency histogram that /metrics exposes and parses."""
    async with running_server(server_config(redis_server.url)) as srv:
        before = await scrape(srv.port)
        async with connect(srv, "alice", skip=True) as alice:
            await alice.send({"type": "get_rooms"})
            await alice.expect("rooms_list", skip=True)
        after = await scrape(srv.port)
    counted = "aleatoria_redis_call_duration_seconds_count"
    assert after[counted] > before.get(counted, 0.0)
    assert after["aleatoria_redis_call_duration_seconds_bucket"] == after[counted]
    assert 0 == after["aleatoria_redis_degraded"]
