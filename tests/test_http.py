"""The HTTP side of the one port: /health, routing, handshake refusals, Origin rules,
malformed and oversize request heads. Requests are raw bytes over real TCP."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from inmemory import InMemoryServer, inmemory_server
from rawws import (
    RawStream,
    health,
    http_exchange,
    http_get,
    open_raw_ws,
    open_tcp,
    parse_response,
    read_response_head,
    upgrade_request,
)
from support import connect

from aleatoria.http import _query

PUBLIC_ORIGIN = "https://www.aleatoria.chat"


async def upgrade_status(
    server: InMemoryServer, target: str = "/ws?userId=alice", **kw: object
) -> tuple[int, bytes]:
    """Send an upgrade request; return the status and body (empty for 101). A 101
    connection is closed again at once."""
    async with open_tcp(server) as conn:
        await conn.send(upgrade_request(server.port, target, **kw))  # type: ignore[arg-type]
        response = await read_response_head(conn)
    return response.status, response.body


async def assert_serves_others(server: InMemoryServer) -> None:
    """A WebSocket client still gets its pong and /health still answers."""
    async with connect(server, "bystander") as peer:
        await peer.request({"type": "ping"}, "pong")
    assert "ok" == (await health(server))["status"]


# -- plain HTTP -------------------------------------------------------------------------------


async def test_health_is_json_ok_with_redis_disabled(server: InMemoryServer) -> None:
    """/health: 200, JSON, status ok, redis disabled (in-memory store), a connection count."""
    response = await http_get(server, "/health")
    assert 200 == response.status
    assert response.headers["content-type"].startswith("application/json")
    body = json.loads(response.body)
    assert ("ok", "disabled") == (body["status"], body["redis"])
    assert 0 == body["connections"]
    async with connect(server, "counted"):
        assert 1 == (await health(server))["connections"]


async def test_head_health_has_headers_and_no_body(server: InMemoryServer) -> None:
    """HEAD /health answers 200 with the GET's headers and no body bytes on the wire."""
    async with open_tcp(server) as conn:
        await conn.send(f"HEAD /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        with trio.fail_after(10):
            raw = await conn.read_to_eof()
    _, _, after = raw.partition(b"\r\n\r\n")
    assert b"" == after
    response = parse_response(raw, method="HEAD")
    assert 200 == response.status
    assert response.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("path", ["/nope", "/ws/", "/health/x", "/%00", "/../../etc/passwd"])
async def test_unknown_path_is_404_with_short_text(server: InMemoryServer, path: str) -> None:
    """An unknown path gets 404 with a short plain-text body."""
    response = await http_get(server, path)
    assert 404 == response.status
    assert response.headers["content-type"].startswith("text/plain")
    assert 0 < len(response.body) < 200


async def test_post_to_health_is_405(server: InMemoryServer) -> None:
    """A non-GET/HEAD method on a plain endpoint is 405."""
    request = f"POST /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Length: 2\r\n\r\n{{}}"
    assert 405 == (await http_exchange(server, request.encode())).status


async def test_bundled_page_is_served_at_root(server: InMemoryServer) -> None:
    """GET / serves the demo page as HTML."""
    response = await http_get(server, "/")
    assert 200 == response.status
    assert response.headers["content-type"].startswith("text/html")
    assert b"<html" in response.body.lower()


# -- handshake refusals -------------------------------------------------------------------------


async def test_ws_without_upgrade_headers_is_400(server: InMemoryServer) -> None:
    """GET /ws as a plain request (no Upgrade/Connection/key headers) is 400."""
    response = await http_get(server, "/ws?userId=alice")
    assert 400 == response.status
    assert 0 < len(response.body) < 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-WebSocket-Version": "8"},
        {"Sec-WebSocket-Key": "short"},
        {"Sec-WebSocket-Key": "!" * 24},  # 24 characters, not base64
        {"Sec-WebSocket-Key": "A" * 24},  # base64 of 18 bytes, not 16
        {"Connection": "keep-alive"},
        {"Upgrade": "h2c"},
        {"Upgrade": "notwebsocketfoo"},  # once matched as a substring
    ],
    ids=[
        "version-8",
        "short-key",
        "key-not-base64",
        "key-not-16-bytes",
        "no-connection-upgrade",
        "wrong-upgrade",
        "upgrade-containing-websocket",
    ],
)
async def test_bad_upgrade_headers_are_400(server: InMemoryServer, headers: dict[str, str]) -> None:
    """A malformed upgrade (wrong version, bad key, missing tokens) is 400."""
    lines = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    lines.update(headers)
    request = upgrade_request(server.port, "/ws?userId=alice", upgrade=False, headers=lines)
    assert 400 == (await http_exchange(server, request)).status


async def test_upgrade_over_http_1_0_is_400(server: InMemoryServer) -> None:
    """RFC 6455 asks for HTTP/1.1: an HTTP/1.0 request with every upgrade header is 400; the
    list form of Upgrade is accepted over HTTP/1.1."""
    request = upgrade_request(server.port, "/ws?userId=alice").replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    assert b" HTTP/1.0\r\n" in request
    assert 400 == (await http_exchange(server, request)).status
    listed = upgrade_request(server.port, "/ws?userId=bob").replace(
        b"Upgrade: websocket", b"Upgrade: websocket, h2c", 1
    )
    async with open_tcp(server) as conn:
        await conn.send(listed)
        assert 101 == (await read_response_head(conn)).status


@pytest.mark.parametrize(
    "target",
    [
        "/ws",
        "/ws?room=Lobby",
        "/ws?userId=",
        "/ws?userId=a:b",
        "/ws?userId=a%3Ab",
        "/ws?userId=a%20b",
        "/ws?userId=%C3%A9",
        "/ws?userId=" + "u" * 65,
        "/ws?userId=" + "u" * 7000,
    ],
    ids=[
        "missing",
        "missing-with-room",
        "empty",
        "colon",
        "colon-encoded",
        "space",
        "non-ascii",
        "65-chars",
        "7000-chars",
    ],
)
async def test_missing_or_invalid_user_id_is_400(server: InMemoryServer, target: str) -> None:
    """A missing, empty, over-long or ill-formed userId gets 400 with a short text."""
    status, body = await upgrade_status(server, target)
    assert 400 == status
    assert 0 < len(body) < 200


async def test_user_id_over_the_head_limit_is_431(server: InMemoryServer) -> None:
    """A 10 KB userId pushes the head past 8 KiB: refused whole with 431, not 400; the server goes on."""
    status, _ = await upgrade_status(server, "/ws?userId=" + "u" * 10_000)
    assert 431 == status
    await assert_serves_others(server)


@pytest.mark.parametrize(
    "room", ["", "a:b", "a%20b", "r" * 65, "%F0%9F%8E%B2"], ids=["empty", "colon", "space", "65", "emoji"]
)
async def test_invalid_room_is_400(server: InMemoryServer, room: str) -> None:
    """An invalid ``room`` query parameter gets 400."""
    status, _ = await upgrade_status(server, f"/ws?userId=alice&room={room}")
    assert 400 == status


async def test_valid_room_and_user_are_upgraded(server: InMemoryServer) -> None:
    """Ids using every allowed character class upgrade (101) and join the URL's room."""
    async with open_raw_ws(server, "A-z_0.9@x", room="Room-1_.@") as ws:
        await ws.send_json({"type": "get_rooms"})
        assert ["Room-1_.@"] == (await ws.expect("rooms_list"))["payload"]["rooms"]


async def test_post_ws_is_refused(server: InMemoryServer) -> None:
    """POST /ws with upgrade headers is not upgraded: 400 (an upgrade needs GET)."""
    status, _ = await upgrade_status(server, method="POST")
    assert 400 == status


# -- Origin ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        (PUBLIC_ORIGIN, 101),
        (PUBLIC_ORIGIN + ":443", 101),
        ("HTTPS://WWW.Aleatoria.Chat", 101),
        (PUBLIC_ORIGIN + "/", 101),
        (None, 101),
        ("http://www.aleatoria.chat", 403),
        (PUBLIC_ORIGIN + ":8443", 403),
        ("https://aleatoria.chat", 403),
        ("https://www.aleatoria.chat.evil.example", 403),
        ("https://evil.example", 403),
        ("null", 403),
        ("", 403),
        ("https://www.aleatoria.chat:99999", 403),
    ],
)
async def test_allowed_origins(origin: str | None, expected: int) -> None:
    """With an allow-list, Origins match after normalising case and default port; others get 403."""
    async with inmemory_server(allowed_origins=(PUBLIC_ORIGIN,)) as server:
        status, _ = await upgrade_status(server, origin=origin)
        assert expected == status


async def test_allowed_origin_listed_with_explicit_default_port() -> None:
    """An allow-list entry written with ``:443`` matches an Origin without a port."""
    async with inmemory_server(allowed_origins=(PUBLIC_ORIGIN + ":443",)) as server:
        assert 101 == (await upgrade_status(server, origin=PUBLIC_ORIGIN))[0]
        assert 403 == (await upgrade_status(server, origin="https://evil.example"))[0]


async def test_same_origin_is_accepted_foreign_origin_is_403(server: InMemoryServer) -> None:
    """Without an allow-list the server's own host:port is accepted and any other Origin gets 403."""
    port = server.port
    assert 101 == (await upgrade_status(server, origin=f"http://127.0.0.1:{port}"))[0]
    assert 403 == (await upgrade_status(server, origin=f"http://127.0.0.1:{port + 1}"))[0]
    assert 403 == (await upgrade_status(server, origin="http://127.0.0.1"))[0]
    assert 403 == (await upgrade_status(server, origin="https://www.aleatoria.chat"))[0]


async def test_missing_origin_rejected_when_required() -> None:
    """require_origin: no Origin header is 403; a same-origin request still upgrades."""
    async with inmemory_server(require_origin=True) as server:
        assert 403 == (await upgrade_status(server))[0]
        assert 101 == (await upgrade_status(server, origin=f"http://127.0.0.1:{server.port}"))[0]


async def test_wildcard_allows_any_origin() -> None:
    """``*`` in the allow-list accepts any Origin (and none)."""
    async with inmemory_server(allowed_origins=("*",)) as server:
        for origin in ("https://evil.example", "null", None):
            assert 101 == (await upgrade_status(server, origin=origin))[0]


# -- malformed and oversize heads ---------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff\xfe garbage\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS ClientHello
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ],
    ids=["binary", "no-target", "bad-header", "negative-length", "tls", "http2-preface"],
)
async def test_malformed_request_is_refused_and_server_goes_on(
    server: InMemoryServer, garbage: bytes
) -> None:
    """Malformed HTTP gets a 4xx answer or a closed connection, never a crash."""
    async with open_tcp(server) as conn:
        await conn.send(garbage)
        with trio.fail_after(10):
            raw = await conn.read_to_eof()
    if raw:
        status = int(raw.split(b" ", 2)[1])
        assert 400 <= status < 500, raw
    await assert_serves_others(server)


@pytest.mark.parametrize("where", ["target", "header"])
async def test_request_head_over_8_kib_is_refused(server: InMemoryServer, where: str) -> None:
    """A request head over 8 KiB is refused with 431 and the connection closed."""
    big = "x" * 9000
    target = f"/health?pad={big}" if where == "target" else "/health"
    headers = {"X-Pad": big} if where == "header" else {}
    request = upgrade_request(server.port, target, upgrade=False, headers=headers)
    assert 431 == (await http_exchange(server, request)).status
    await assert_serves_others(server)


@pytest.mark.parametrize(("size", "expected"), [(8192, 200), (8193, 431)])
async def test_head_limit_is_exactly_8_kib(server: InMemoryServer, size: int, expected: int) -> None:
    """A request head of exactly 8192 bytes is served; one byte more is refused with 431."""
    base = upgrade_request(server.port, "/health", upgrade=False, headers={"X-Pad": ""})
    request = base.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (size - len(base)))
    assert size == len(request)
    assert expected == (await http_exchange(server, request)).status


async def test_endless_header_stream_is_cut_off(server: InMemoryServer) -> None:
    """A client sending header lines forever is refused once 8 KiB have arrived."""
    async with open_tcp(server) as conn:
        await conn.send(b"GET /health HTTP/1.1\r\n")
        with trio.fail_after(10):
            try:
                for i in range(10_000):
                    await conn.send(f"X-{i}: {'y' * 100}\r\n".encode())
            except trio.BrokenResourceError:
                pass
            raw = await _read_what_is_there(conn)
    if raw:
        assert raw.startswith(b"HTTP/1.1 431 "), raw[:100]
    await assert_serves_others(server)


async def _read_what_is_there(conn: RawStream) -> bytes:
    try:
        return await conn.read_to_eof()
    except trio.ClosedResourceError:
        return b""


async def test_client_vanishing_mid_head_does_not_disturb_the_server(server: InMemoryServer) -> None:
    """A client that sends half a head and then resets is forgotten quietly."""
    async with open_tcp(server) as conn:
        await conn.send(b"GET /ws?userId=gone HTTP/1.1\r\nHost: x\r\nUpgr")
        conn.reset_on_close()
    await assert_serves_others(server)


async def test_pipelined_second_request_is_not_answered(server: InMemoryServer) -> None:
    """Plain HTTP is one request per connection: a pipelined second request is not answered."""
    one = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n"
    raw_two = (one + one.replace("/health", "/nope")).encode()
    async with open_tcp(server) as conn:
        await conn.send(raw_two)
        with trio.fail_after(10):
            raw = await conn.read_to_eof()
    assert 1 == raw.count(b"HTTP/1.1 ")
    assert 200 == parse_response(raw).status


# Query strings made of the characters that matter to a query parser, and a few others.
_QUERIES = st.text(alphabet="ab=&;%+2F0 é", max_size=30)


@given(_QUERIES)
def test_query_parsing_is_parse_qs(text: str) -> None:
    """The request head's query parser (a fast path for text that needs no unquoting) gives
    what ``parse_qs(keep_blank_values=True)`` gives, for any query."""
    assert parse_qs(text, keep_blank_values=True) == _query(text)
