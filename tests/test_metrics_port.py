"""``ALEATORIA_METRICS_PORT`` on a single process: /health and /metrics answer there too,
from the process's own figures (the --workers parent's merged view is tested in
tests/scaleout/test_metrics_view.py); the /health body's keys are the documented ones."""

from __future__ import annotations

import pytest
import trio
from health import documented_health_bodies, get_json
from prometheus_client.parser import text_string_to_metric_families
from redis_server import free_port
from support import running_server

pytestmark = pytest.mark.loopback  # a second listening port


async def _get(port: int, path: str) -> tuple[bytes, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


async def test_a_single_process_answers_on_its_metrics_port() -> None:
    """With metrics_port set, /health and /metrics answer on it (the same figures as on the
    main port), and anything else there is 404: the demo page and /ws stay on the main port."""
    port = free_port()
    async with running_server(metrics_port=port) as server:
        main = await get_json(server.port, "/health")
        view = await get_json(port, "/health")
        assert main["instance"] == view["instance"]
        head, body = await _get(port, "/metrics")
        assert head.startswith(b"HTTP/1.1 200 ")
        names = {family.name for family in text_string_to_metric_families(body.decode())}
        assert "aleatoria_connections" in names
        head, _ = await _get(port, "/")
        assert head.startswith(b"HTTP/1.1 404 ")


async def test_the_documented_health_body_is_the_real_one() -> None:
    """docs/operations.md's /health example for one process has exactly the keys the server
    sends (memory store here; the values differ)."""
    async with running_server() as server:
        real = await get_json(server.port, "/health")
    single = documented_health_bodies()[0]
    assert sorted(single) == sorted(real)
    assert {"status": "ok", "redis": "disabled", "store": "memory", "bus": "disabled"} == {
        key: real[key] for key in ("status", "redis", "store", "bus")
    }
