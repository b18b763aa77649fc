"""The operator API (``/admin``) as the tests call it: raw HTTP/1.1 requests (over TCP or an
in-memory socket pair: any ``support.Target``), so that a test can send exactly the bytes it
means (a bad header, a wrong length, half a body)."""

from __future__ import annotations

import json
from typing import Any

import trio
from rawws import Response, http_exchange, open_tcp, read_response_head, upgrade_request
from support import Target, tcp

TOKEN = "operator-token-for-tests"


def admin_request(
    port: int,
    method: str,
    path: str,
    *,
    body: Any = None,
    raw_body: bytes | None = None,
    token: str | None = TOKEN,
    authorization: str | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    """The bytes of one request: ``body`` as JSON (or ``raw_body`` as is), ``Authorization:
    Bearer <token>`` unless ``authorization`` gives the whole header value."""
    data = raw_body if raw_body is not None else (b"" if body is None else json.dumps(body).encode())
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    elif token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if data or method in ("POST", "PUT", "PATCH"):
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


async def admin(server: Target | int, method: str, path: str, **kw: Any) -> Response:
    """One request to the operator API; its response."""
    request = admin_request(tcp(server).port, method, path, **kw)
    return await http_exchange(server, request, method=method)


async def admin_json(server: Target | int, method: str, path: str, expected: int = 200, **kw: Any) -> Any:
    """One request whose status must be ``expected``; its JSON body."""
    response = await admin(server, method, path, **kw)
    assert expected == response.status, response
    assert response.headers["content-type"].startswith("application/json"), response
    return json.loads(response.body)


async def handshake_status(server: Target | int, user: str) -> tuple[int, bytes]:
    """The status (and body) of ``user``'s WebSocket upgrade; a 101 is closed at once."""
    async with open_tcp(server) as conn:
        await conn.send(upgrade_request(tcp(server).port, f"/ws?userId={user}"))
        response = await read_response_head(conn)
    return response.status, response.body


async def wait_for_handshake(server: Target | int, user: str, status: int, timeout: float = 15.0) -> None:
    """Poll ``user``'s handshake until it answers ``status`` (a timed ban ending is seen from
    outside only this way), within ``timeout``."""
    with trio.fail_after(timeout):
        while True:
            if (await handshake_status(server, user))[0] == status:
                return
            await trio.sleep(0.05)  # the handshake is the observable; nothing is pushed
