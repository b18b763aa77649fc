"""Operations and security: tokens, caps, half-open clients, rate limits, metrics, logs."""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from support import RunningServer, connect, running_server
from trio_websocket import ConnectionRejected, HandshakeError

from aleatoria import server
from aleatoria.auth import make_token
from aleatoria.cli import main
from aleatoria.config import Config

pytestmark = pytest.mark.loopback  # caps by peer address, half-open TCP, a flood over TCP, real handshakes

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cret-s3cret-s3cret-s3cret-s3cret!"


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """One plain HTTP/1.1 GET; returns (status, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), body


async def rejected_status(srv: RunningServer, user: str, query: str = "") -> int:
    """The HTTP status of a refused WebSocket handshake."""
    statuses: list[int] = []
    try:
        async with connect(srv, user + query, joined=False):
            pass
    except* ConnectionRejected as group:
        statuses = [exc.status_code for exc in group.exceptions if isinstance(exc, ConnectionRejected)]
    assert 1 == len(statuses), "the handshake was not refused"
    return statuses[0]


async def test_tokens_over_a_real_handshake() -> None:
    """With a secret: valid token in; missing, malformed, expired, wrong secret, wrong sub: 401."""
    async with running_server(auth_secret=SECRET) as srv:
        good = make_token("alice", SECRET, 60)
        async with connect(srv, f"alice&token={good}") as alice:
            await alice.request({"type": "ping"}, "pong")
        cases = {
            "missing": "",
            "malformed": "&token=not.a.jwt",
            "expired": "&token=" + make_token("alice", SECRET, -5),
            "wrong secret": "&token=" + make_token("alice", "another-secret-another-secret-xx", 60),
            "wrong sub": "&token=" + make_token("mallory", SECRET, 60),
        }
        for name, query in cases.items():
            assert 401 == await rejected_status(srv, "alice", query), name


def test_token_command_prints_a_valid_token(capsys: pytest.CaptureFixture[str]) -> None:
    """`aleatoria token USERID --ttl 1h` prints a token the server accepts."""
    import jwt

    assert 0 == main(["token", "alice", "--ttl", "1h", "--secret", SECRET])
    claims = jwt.decode(capsys.readouterr().out.strip(), SECRET, algorithms=["HS256"])
    assert "alice" == claims["sub"]
    assert 3500 < claims["exp"] - time.time() <= 3600
    assert 2 == main(["token", "a:b", "--secret", SECRET])


async def test_connection_caps() -> None:
    """Beyond max_connections: 503 to the upgrade. Beyond max_connections_per_ip sockets from
    one address (counted from accept): 503 at once, without reading the request."""
    async with running_server(max_connections=2) as srv, connect(srv, "a"), connect(srv, "b"):
        assert 503 == await rejected_status(srv, "c")
    async with running_server(max_connections_per_ip=1) as srv:
        async with connect(srv, "a"):
            with trio.socket.socket() as sock:
                await sock.connect(("127.0.0.1", srv.port))
                with trio.fail_after(5):
                    assert (await sock.recv(4096)).startswith(b"HTTP/1.1 503 ")
        # The cap counts live sockets: once "a" has gone, "b" gets in.
        with trio.fail_after(5):
            while True:
                try:
                    async with connect(srv, "b") as b:
                        await b.request({"type": "ping"}, "pong")
                        break
                except* (ConnectionRejected, HandshakeError, OSError):
                    await trio.sleep(0.01)  # "a" is still closing; retry until it has


def test_fd_limit_warning_says_what_is_needed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A hard open-files limit equal to max_connections (the defaults on a 20,000 limit)
    warns with the number needed (max_connections plus the spare descriptors) and the
    max_connections that fits; a limit that covers fds_needed does not warn. The docs
    give the same number."""
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (20_000, 20_000))
    caplog.set_level(logging.WARNING, logger="aleatoria.server")
    config = Config()
    server._raise_fd_limit(config)
    needed = server.fds_needed(config)
    (record,) = [r.getMessage() for r in caplog.records if "fd_limit_low" in r.getMessage()]
    assert f"limit=20000 needed={needed} max_connections=20000" in record
    spare = needed - config.max_connections
    assert f"plus {spare} spare descriptors; raise it to {needed}" in record
    assert f"lower ALEATORIA_MAX_CONNECTIONS to {20_000 - spare}" in record
    caplog.clear()
    server._raise_fd_limit(Config(max_connections=20_000 - spare))
    assert not [r for r in caplog.records if "fd_limit_low" in r.getMessage()]
    operations = (REPO / "docs" / "operations.md").read_text()
    assert f"plus\n  {spare} spare descriptors" in operations
    assert f"{needed:,} at the default settings" in operations


async def test_half_open_connections_time_out_and_block_nobody() -> None:
    """200 TCP connections that never finish their request head do not slow a real client,
    and are closed after the handshake timeout."""
    async with running_server(handshake_timeout=1.0) as srv:
        streams = []
        try:
            for i in range(200):
                stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
                streams.append(stream)
                if i % 2:
                    await stream.send_all(b"GET /ws?userId=x HTTP/1.1\r\nHost: a\r\n")
            with trio.fail_after(2):
                async with connect(srv, "alice") as alice:
                    await alice.request({"type": "ping"}, "pong")
            with trio.fail_after(10):
                for stream in streams:
                    while await stream.receive_some(4096):
                        pass  # a 408-style answer or nothing; then EOF
        finally:
            for stream in streams:
                await stream.aclose()


async def test_flooding_client_does_not_hurt_a_calm_one() -> None:
    """A client flooding a room is rate limited; a calm member of the same room keeps a p99
    round-trip latency under 100 ms (measured here, generous bound)."""
    async with (
        running_server(rate_limit=30.0, rate_burst=60, rate_abuse_seconds=3600.0) as srv,
        connect(srv, "flood") as flood,
        connect(srv, "calm") as calm,
    ):
        latencies: list[float] = []
        done = trio.Event()

        async def flooding() -> None:
            payload = '{"type":"chat_message","room":"Lobby","payload":{"content":"spam"}}'
            while not done.is_set():
                await flood.ws.send_message(payload)
                await trio.lowlevel.checkpoint()

        async def drain_flood() -> None:
            while not done.is_set():
                await flood.recv()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flooding)
            nursery.start_soon(drain_flood)
            for i in range(50):
                started = trio.current_time()
                await calm.send({"type": "chat_message", "room": "Lobby", "payload": {"content": f"c{i}"}})
                while True:
                    message = await calm.recv()
                    if message.get("fromUser") == "calm":
                        break
                latencies.append(trio.current_time() - started)
                await trio.sleep(0.02)  # a human-paced client, not synchronisation
            done.set()
            nursery.cancel_scope.cancel()
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        assert p99 < 0.1, latencies


async def test_metrics_parse_and_move_with_traffic(server: RunningServer) -> None:
    """/metrics is Prometheus text that prometheus-client parses; counters follow traffic."""

    async def scrape() -> dict[str, float]:
        status, body = await http_get(server.port, "/metrics")
        assert 200 == status
        values = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}"] = sample.value
        return values

    before = await scrape()
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        await alice.send({"type": "chat_message", "room": "Lobby", "payload": {"content": "x"}})
        await bob.expect("chat_message")
        await alice.expect("chat_message")
        await alice.send({"type": "nope"})
        await alice.expect("error")
        during = await scrape()
    assert 2 == during["aleatoria_connections{}"]
    assert 1 == during["aleatoria_messages_in_total{type=chat_message}"]
    assert 1 == during["aleatoria_messages_in_total{type=unknown}"]
    assert 1 == during["aleatoria_errors_total{code=unknown_type}"]
    assert 2 <= during["aleatoria_deliveries_total{}"] - before.get("aleatoria_deliveries_total{}", 0)
    assert 2 == during["aleatoria_connections_opened_total{}"]
    assert 0 == during["aleatoria_redis_degraded{}"]


async def test_logs_hold_no_content_and_no_secrets() -> None:
    """At info level (and debug) the log names events and users, never message content,
    tokens or the auth secret."""
    content = "TOP-SECRET-CONTENT-4242"
    token = make_token("alice", SECRET, 60)
    env = {**os.environ, "ALEATORIA_AUTH_SECRET": SECRET, "PYTHONUNBUFFERED": "1"}
    for level in ("info", "debug"):
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                partial(
                    trio.run_process,
                    [sys.executable, "-m", "aleatoria", "serve", "--port", "0", "--log-level", level],
                    stderr=subprocess.PIPE,
                    env=env,
                    check=False,
                )
            )
            log = b""
            with trio.fail_after(20):
                while b"listening on ws://" not in log:
                    log += await process.stderr.receive_some(4096)
                port = int(log.split(b"ws://127.0.0.1:")[1].split(b"/")[0])
                srv = RunningServer(port, None, nursery.cancel_scope)  # type: ignore[arg-type]
                async with connect(srv, f"alice&token={token}") as alice:
                    await alice.send(
                        {"type": "chat_message", "room": "Lobby", "payload": {"content": content}}
                    )
                    await alice.expect("chat_message")
                    await alice.send(
                        {"type": "chat_message", "toUser": "bob", "payload": {"content": content}}
                    )
                    await alice.expect("chat_message")
                process.terminate()
                while chunk := await process.stderr.receive_some(4096):
                    log += chunk
            text = log.decode()
            assert "event=connected user=alice" in text
            for secret in (content, token, SECRET):
                assert secret not in text, level
