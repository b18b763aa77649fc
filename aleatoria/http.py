"""The HTTP edge: request heads (h11), plain answers, the small routes, the upgrade's 101.

How this works. h11 reads the head of the one request a socket carries; a plain HTTP
request gets one response (``answer_http``: /health, /metrics, the demo page, 404, 405)
and the socket closes. A WebSocket upgrade (``/ws``) that passes the server's checks
(``handshake_problem`` among them) becomes a ``WebSocket`` (``accept_websocket``) whose
first write carries the fixed 101 response. The server decides who may connect; this
module only speaks HTTP.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import orjson
import trio
from prometheus_client import CollectorRegistry
from wsproto.utilities import generate_accept_token

from aleatoria import metrics
from aleatoria.connection import WebSocket
from aleatoria.flusher import Flusher

__all__ = [
    "MAX_HEAD_BYTES",
    "BodyTooLarge",
    "Request",
    "accept_websocket",
    "answer_http",
    "handshake_problem",
    "read_body",
    "read_request",
    "send_all",
    "send_http",
]

MAX_HEAD_BYTES = 8192

_SWITCHING_PROTOCOLS = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"upgrade: websocket\r\n"
    b"connection: Upgrade\r\n"
    b"sec-websocket-accept: %s\r\n\r\n"
)


@attrs.frozen
class Request:
    """The parsed head of one HTTP request."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[bytes, bytes]  # lower-cased names; repeated headers joined with ", "
    h11_connection: h11.Connection = attrs.field(repr=False, eq=False)

    def param(self, name: str) -> str | None:
        """The first value of query parameter ``name``, or None."""
        values = self.query.get(name)
        return values[0] if values else None

    def header(self, name: bytes) -> str | None:
        """Header ``name`` (lower case) as text, or None."""
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")


class _HttpConnection(h11.Connection):
    """h11's server side, remembering the request method (h11 keeps its copy private):
    the answer to HEAD carries headers only."""

    request_method = b""


async def read_request(sock: socket.socket) -> Request | None:
    """Read one request head of at most ``MAX_HEAD_BYTES``. Returns None after answering
    malformed requests (400; 431 for an oversize head), or silently if the peer went away.
    The caller bounds the wait with a timeout; cancellation leaves the socket to the caller."""
    # h11 measures only an *incomplete* head, so a head completed by one large read would
    # slip past its limit: never hand it more than MAX_HEAD_BYTES before the head is done.
    conn = _HttpConnection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES - 1)
    received = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            # OSError: the peer is gone (it may have left mid-head), nobody to answer.
            with contextlib.suppress(OSError):
                await send_http(sock, exc.error_status_hint, f"Bad request: {exc}\n", conn=conn)
            return None
        if isinstance(event, h11.Request):
            break
        if event is h11.NEED_DATA:
            data = await _recv_some(sock, max(1, MAX_HEAD_BYTES - received))
            received += len(data)
            conn.receive_data(data)
            continue
        return None  # ConnectionClosed or PAUSED before a request: nothing to answer
    conn.request_method = event.method
    target = event.target.decode("latin-1")
    parts = urlsplit(target)
    headers: dict[bytes, bytes] = {}
    for name, value in event.headers:
        headers[name] = headers[name] + b", " + value if name in headers else value
    return Request(
        method=event.method.decode("latin-1"),
        path=parts.path,
        query=parse_qs(parts.query, keep_blank_values=True),
        headers=headers,
        h11_connection=conn,
    )


async def send_http(
    sock: socket.socket,
    status: int,
    body: str | bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    conn: h11.Connection | None = None,
    extra_headers: list[tuple[str, str]] | None = None,
) -> None:
    """Answer a plain HTTP request and let the caller close the socket. Raises OSError if
    the peer is gone; cancellation may leave the answer half sent."""
    conn = conn or h11.Connection(h11.SERVER)
    data = body.encode() if isinstance(body, str) else body
    headers = [
        ("content-type", content_type),
        ("content-length", str(len(data))),
        ("connection", "close"),
        ("cache-control", "no-store"),
        *(extra_headers or []),
    ]
    if isinstance(conn, _HttpConnection) and conn.request_method == b"HEAD":
        data = b""  # same headers as GET (content-length included), no body
    try:
        out = conn.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
        out = (out or b"") + (conn.send(h11.Data(data=data)) or b"") if data else out
        out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
    except h11.LocalProtocolError:
        # h11 refuses to answer when the request state does not allow it (e.g. a broken
        # head it already rejected): build the minimal answer from a fresh state machine.
        fresh = h11.Connection(h11.SERVER)
        fresh.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        fresh.next_event()
        out = fresh.send(h11.Response(status_code=status, headers=headers, reason=_reason(status))) or b""
        out += fresh.send(h11.Data(data=data)) or b""
    await send_all(sock, out)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


async def answer_http(
    sock: socket.socket,
    request: Request,
    *,
    health: Callable[[], dict[str, object]],
    registry: CollectorRegistry,
    page: bytes | None,
) -> None:
    """Answer a plain HTTP request (any path but ``/ws``): ``/health`` (the JSON of
    ``health()``), ``/metrics`` (``registry`` in Prometheus text format), ``/`` (``page``,
    the demo client, when bundled), else 404; 405 for methods other than GET and HEAD.
    Raises OSError if the peer is gone."""
    path = request.path
    conn = request.h11_connection
    if request.method not in ("GET", "HEAD"):
        await send_http(sock, 405, "Method not allowed\n", conn=conn)
    elif path == "/health":
        await send_http(sock, 200, orjson.dumps(health()), content_type="application/json", conn=conn)
    elif path == "/metrics":
        await send_http(sock, 200, metrics.render(registry), content_type=metrics.CONTENT_TYPE, conn=conn)
    elif path == "/" and page is not None:
        await send_http(sock, 200, page, content_type="text/html; charset=utf-8", conn=conn)
    else:
        await send_http(sock, 404, "Not found\n", conn=conn)


def handshake_problem(request: Request) -> str | None:
    """Why ``request`` is not a valid WebSocket upgrade, or None if it is."""
    if request.method != "GET":
        return "WebSocket upgrade needs GET"
    if b"websocket" not in request.headers.get(b"upgrade", b"").lower():
        return "expected an 'Upgrade: websocket' header"
    connection_tokens = {t.strip() for t in request.headers.get(b"connection", b"").lower().split(b",")}
    if b"upgrade" not in connection_tokens:
        return "expected a 'Connection: Upgrade' header"
    if request.headers.get(b"sec-websocket-version") != b"13":
        return "unsupported Sec-WebSocket-Version (need 13)"
    key = request.headers.get(b"sec-websocket-key", b"")
    if len(key) != 24:
        return "missing or malformed Sec-WebSocket-Key"
    return None


def accept_websocket(
    sock: socket.socket,
    request: Request,
    *,
    max_message_bytes: int,
    outbox_frames: int,
    close_timeout: float,
    flusher: Flusher,
    outbox_bytes: int = 1024 * 1024,
    frame_rate: float = 200.0,
    frame_burst: int = 400,
) -> WebSocket:
    """Complete the upgrade of a request that passed ``handshake_problem``."""
    # A fixed head with one computed value: h11 would spend ~20 us (a third of what it
    # spends parsing the request) validating our own constant headers.
    head = _SWITCHING_PROTOCOLS % generate_accept_token(request.headers[b"sec-websocket-key"])
    trailing, _closed = request.h11_connection.trailing_data
    # The 101 is not sent yet: it leaves with the first frames (the server's greeting
    # reply) in one system call when ``serve`` starts.
    return WebSocket(
        sock,
        trailing,
        max_message_bytes=max_message_bytes,
        outbox_frames=outbox_frames,
        close_timeout=close_timeout,
        flusher=flusher,
        greeting=head,
        outbox_bytes=outbox_bytes,
        frame_rate=frame_rate,
        frame_burst=frame_burst,
    )


class BodyTooLarge(Exception):
    """A request body over the limit ``read_body`` was given."""


async def read_body(sock: socket.socket, request: Request, limit: int) -> bytes | None:
    """The body of ``request`` (after its head), at most ``limit`` bytes. Raises
    BodyTooLarge past the limit (a declared content-length too); None if the peer went away
    or sent a broken body. The caller bounds the wait with a timeout."""
    length = request.header(b"content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise BodyTooLarge()
    conn = request.h11_connection
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return None
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > limit:
                raise BodyTooLarge()
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        elif event is h11.NEED_DATA:
            data = await _recv_some(sock, 65536)
            if not data:
                return None
            conn.receive_data(data)
        else:
            return None


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Send everything, waiting for the socket as needed. Raises OSError if the peer is
    gone; cancellation may leave part of ``data`` unsent."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]
    await trio.lowlevel.checkpoint()


async def _recv_some(sock: socket.socket, size: int) -> bytes:
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
        except OSError:
            return b""
