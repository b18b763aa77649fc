"""The HTTP edge: request heads (httptools), plain answers, the small routes, the upgrade's 101.

How this works. httptools (llhttp, the parser uvicorn uses) reads the head of the one request
a socket carries: side by side it costs a sixth of h11 per head, and a connect is mostly its
head (docs/performance.md, "Session 7"). A plain HTTP request gets one response
(``answer_http``: /health, /metrics, the demo page, 404, 405), written by h11, and the socket
closes. A WebSocket upgrade (``/ws``) that passes the server's checks (``handshake_problem``
among them) becomes a ``WebSocket`` (``accept_websocket``) whose first write carries the fixed
101 response. The server decides who may connect; this module only speaks HTTP.
"""

from __future__ import annotations

import binascii
import contextlib
import math
import socket
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import parse_qs

import attrs
import h11
import httptools
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


class _Head:
    """What httptools' callbacks hand over while it parses one request (its "protocol").
    A pipelined request after it is parsed too, and ignored: one request per connection."""

    __slots__ = ("body", "complete", "headers", "headers_done", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}  # lower-cased names; repeats joined with ", "
        self.headers_done = False
        self.body = bytearray()
        self.complete = False

    def on_url(self, url: bytes) -> None:
        if not self.headers_done:
            self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers_done:
            return
        name, value = name.lower(), value.strip()
        headers = self.headers
        headers[name] = headers[name] + b", " + value if name in headers else value

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


@attrs.frozen
class Request:
    """The parsed head of one HTTP request."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[bytes, bytes]  # lower-cased names; repeated headers joined with ", "
    upgrade: bool  # the parser saw an upgrade (Connection: upgrade, an Upgrade header)
    trailing: bytes = attrs.field(repr=False)  # what came after an upgrade's head
    _parser: httptools.HttpRequestParser = attrs.field(repr=False, eq=False, alias="parser")
    _head: _Head = attrs.field(repr=False, eq=False, alias="head")

    def param(self, name: str) -> str | None:
        """The first value of query parameter ``name``, or None."""
        values = self.query.get(name)
        return values[0] if values else None

    def header(self, name: bytes) -> str | None:
        """Header ``name`` (lower case) as text, or None."""
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")


async def read_request(sock: socket.socket, deadline: float = math.inf) -> Request | None:
    """Read one request head of at most ``MAX_HEAD_BYTES``. Returns None after answering
    malformed requests (400, also for HTTP versions but 1.0 and 1.1; 431 for an oversize
    head), or silently if the peer went away. Raises ``trio.TooSlowError`` if the head is
    not whole at ``deadline`` (trio's clock; the answer to a malformed one is bounded by it
    too). The timer starts only if the head must be waited for: nearly every head is in the
    kernel's buffer by the first read, and a cancel scope costs ~5 % of a connect.
    Cancellation leaves the socket to the caller."""
    head = _Head()
    parser = httptools.HttpRequestParser(head)
    received, trailing, upgrade = 0, b"", False
    while not head.headers_done:
        if received >= MAX_HEAD_BYTES:
            await _refuse_head(sock, 431, "Bad request: the request head is too large\n", deadline)
            return None
        # Never more than the head may hold: a head completed by one large read is measured too.
        data = await _recv_some(sock, MAX_HEAD_BYTES - received, deadline)
        if not data:
            return None  # the peer left before a whole head: nobody to answer
        received += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgraded:
            upgrade, trailing = True, data[upgraded.args[0] :]
        except httptools.HttpParserError as exc:
            if not head.headers_done:  # after the head: a pipelined request nobody reads
                await _refuse_head(sock, 400, f"Bad request: {exc}\n", deadline)
                return None
    if parser.get_http_version() not in ("1.1", "1.0"):
        await _refuse_head(sock, 400, "Bad request: HTTP/1.0 and 1.1 only\n", deadline)
        return None
    try:
        url = httptools.parse_url(head.url)
    except httptools.HttpParserInvalidURLError:
        await _refuse_head(sock, 400, "Bad request: invalid request target\n", deadline)
        return None
    return Request(
        method=parser.get_method().decode("latin-1"),
        path=(url.path or b"/").decode("latin-1"),
        query=_query((url.query or b"").decode("latin-1")),
        headers=head.headers,
        upgrade=upgrade,
        trailing=trailing,
        parser=parser,
        head=head,
    )


def _query(text: str) -> dict[str, list[str]]:
    """``parse_qs(text, keep_blank_values=True)``, with a fast path for a query that needs no
    unquoting (no ``%``, no ``+``): the usual ``userId=...&room=...`` costs 0.9 us this way
    against 3.8 us in ``parse_qs``, which is 2 % of a connect."""
    if "%" in text or "+" in text:
        return parse_qs(text, keep_blank_values=True)
    query: dict[str, list[str]] = {}
    for field in text.split("&"):
        if field:
            name, _, value = field.partition("=")
            query.setdefault(name, []).append(value)
    return query


async def _refuse_head(sock: socket.socket, status: int, text: str, deadline: float) -> None:
    # The peer is gone (maybe mid-head), or does not read: nobody to answer.
    with contextlib.suppress(OSError), trio.move_on_at(deadline):
        await send_http(sock, status, text)


async def send_http(
    sock: socket.socket,
    status: int,
    body: str | bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    method: str = "GET",
    extra_headers: list[tuple[str, str]] | None = None,
) -> None:
    """Answer a plain HTTP request (of ``method``: HEAD gets the headers only) and let the
    caller close the socket. Raises OSError if the peer is gone; cancellation may leave the
    answer half sent."""
    data = body.encode() if isinstance(body, str) else body
    headers = [
        ("content-type", content_type),
        ("content-length", str(len(data))),
        ("connection", "close"),
        ("cache-control", "no-store"),
        *(extra_headers or []),
    ]
    # h11 writes (and checks) the response; it needs to have read a request first, and the
    # request was parsed by httptools: it reads a minimal one of the same kind.
    head_only = method == "HEAD"
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"%s / HTTP/1.1\r\nhost: x\r\n\r\n" % (b"HEAD" if head_only else b"GET"))
    conn.next_event()
    out = conn.send(h11.Response(status_code=status, headers=headers, reason=_reason(status))) or b""
    if data and not head_only:  # HEAD: same headers as GET (content-length included), no body
        out += conn.send(h11.Data(data=data)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
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
    path, method = request.path, request.method
    if method not in ("GET", "HEAD"):
        await send_http(sock, 405, "Method not allowed\n", method=method)
    elif path == "/health":
        await send_http(sock, 200, orjson.dumps(health()), content_type="application/json", method=method)
    elif path == "/metrics":
        await send_http(sock, 200, metrics.render(registry), content_type=metrics.CONTENT_TYPE, method=method)
    elif path == "/" and page is not None:
        await send_http(sock, 200, page, content_type="text/html; charset=utf-8", method=method)
    else:
        await send_http(sock, 404, "Not found\n", method=method)


def handshake_problem(request: Request) -> str | None:
    """Why ``request`` is not a valid WebSocket upgrade, or None if it is."""
    if request.method != "GET":
        return "WebSocket upgrade needs GET"
    if request._parser.get_http_version() != "1.1":  # RFC 6455 4.1: HTTP/1.1 or higher
        return "WebSocket upgrade needs HTTP/1.1"
    upgrade = request.headers.get(b"upgrade", b"").lower()
    if upgrade != b"websocket" and b"websocket" not in {t.strip() for t in upgrade.split(b",")}:
        return "expected an 'Upgrade: websocket' header"
    connection = request.headers.get(b"connection", b"").lower()
    # Browsers send the one token; the list form ("keep-alive, Upgrade") is rarer.
    if connection != b"upgrade" and b"upgrade" not in {t.strip() for t in connection.split(b",")}:
        return "expected a 'Connection: Upgrade' header"
    if not request.upgrade:  # the parser did not take it for one (so what follows is not frames)
        return "not an HTTP/1.1 upgrade request"
    if request.headers.get(b"sec-websocket-version") != b"13":
        return "unsupported Sec-WebSocket-Version (need 13)"
    key = request.headers.get(b"sec-websocket-key", b"")
    if len(key) != 24 or not _sixteen_bytes(key):
        return "missing or malformed Sec-WebSocket-Key"
    return None


def _sixteen_bytes(key: bytes) -> bool:
    """Whether ``key`` is base64 of 16 bytes, as RFC 6455 4.1 requires of Sec-WebSocket-Key."""
    try:
        return len(binascii.a2b_base64(key, strict_mode=True)) == 16
    except binascii.Error:
        return False


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
    trailing = request.trailing
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
    head, parser = request._head, request._parser
    while not head.complete:
        if len(head.body) > limit:
            raise BodyTooLarge()
        data = await _recv_some(sock, 65536)
        if not data:
            return None
        try:
            parser.feed_data(data)
        except httptools.HttpParserError:
            return None
    if len(head.body) > limit:
        raise BodyTooLarge()
    return bytes(head.body)


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


async def _recv_some(sock: socket.socket, size: int, deadline: float = math.inf) -> bytes:
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            with trio.fail_at(deadline):
                await trio.lowlevel.wait_readable(sock)
        except OSError:
            return b""
