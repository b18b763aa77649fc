"""The HTTP/WebSocket edge: h11 parses request heads, wsproto runs frames, on raw sockets.

How this works. Every connection is a non-blocking stdlib socket; we wait on it with
``trio.lowlevel.wait_readable``/``wait_writable`` (trio's own primitives) and call
``recv``/``send`` directly, which costs a fraction of ``trio.SocketStream``'s per-call
bookkeeping. h11 reads the request head; plain HTTP requests get one response and the
socket closes. After an upgrade, inbound bytes go through a fast path for the frames nearly
every client sends (``_take_simple``) until the first frame that needs wsproto; from then
on ``wsproto.Connection`` runs the connection (created only then, or to send a close).

Every frame counts (PROTOCOL.md section 16): pings, pongs, a peer's close and every frame of
a fragmented message -- empty continuations included -- take a token from a per-connection
bucket (``frame_rate`` per second, ``frame_burst`` at most; refilled from the time of the
last ``recv``, so no clock is read per frame). A connection over it is failed with 1008 and
nothing more it sent is parsed (so a ping flood gets at most ``frame_burst`` pongs). A data
frame that is a whole message costs nothing here: the message rate limit (section 4) counts
it as a message, and benchmarks that turn that limit off expect thousands of messages a
second on one connection.

Outbound policy, in ``WebSocket.send``: frames wait in the connection until the end of
the scheduler pass (``aleatoria.flusher``), then go to the kernel in one write
(``send_now``, for room broadcasts, writes at once behind anything waiting); when the
kernel buffer is full, queue the rest in a bounded backlog drained by a writer task started
on demand (in the server's connection nursery; ``serve`` stops it); a backlog that reaches
its bound -- ``outbox_frames`` frames, or ``outbox_bytes`` bytes behind the entry being
written (so one large history reply to a client that reads is fine) -- means the client is
not reading: it is disconnected with 1013 rather than silently losing messages. Frames
waiting for the flusher are bounded the same way (written at once when they reach either
bound). Server frames are unmasked, so one frame's bytes (``text_frame``) can go to every
member of a room.

Closing: ``close(code)`` sends the close frame and gives the peer ``close_timeout`` seconds
to answer before the socket is dropped; ``serve`` returns once the connection is over.
Inbound stream errors (bad framing 1002, bad UTF-8 1007, a message over the limit 1009)
*fail* the connection instead (RFC 6455 7.1.7): after the close frame nothing more is
parsed; we send FIN and discard input until the peer's EOF (a "lingering close", bounded by
the same deadline), since closing with unread input would reset the connection and could
destroy the close frame in flight. Waiting for a close answer would be pointless there:
a peer in the middle of a 2**40-byte frame cannot send one.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import socket
import struct
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio
from wsproto import ConnectionType
from wsproto.connection import Connection as _WsConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason, XorMaskerSimple
from wsproto.utilities import generate_accept_token

from aleatoria.flusher import Flusher

log = logging.getLogger("aleatoria.websocket")

RECV_BYTES = 65536
# wsproto events handled before other tasks may run: 64 small frames take ~1 ms of wsproto,
# where a recv of 64 KiB holds 10,000 empty frames (and a frame budget's burst, 400 of them).
_COLLECT_EVENTS = 64
MAX_HEAD_BYTES = 8192
_WRITEV_MAX = 512  # buffers per sendmsg call, well under IOV_MAX

# Close codes used by the server (RFC 6455 and PROTOCOL.md section 5).
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
TRY_AGAIN_LATER = 1013
REPLACED = 4001
TOKEN_EXPIRED = 4002
ABNORMAL = 1006

PING_FRAME = b"\x89\x00"

_SWITCHING_PROTOCOLS = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"upgrade: websocket\r\n"
    b"connection: Upgrade\r\n"
    b"sec-websocket-accept: %s\r\n\r\n"
)

_TEXT = 0x1
_BINARY = 0x2
_PING = 0x9
_PONG = 0xA
_FAST_OPCODES = frozenset((_TEXT, _BINARY, _PING, _PONG))
TOO_MANY_FRAMES = "too many frames"


def text_frame(payload: bytes) -> bytes:
    """One unmasked, final text frame carrying ``payload`` (UTF-8 JSON).

    Built here rather than by wsproto because wsproto encodes text frames from ``str``
    only: the JSON is already UTF-8 bytes, and one frame serves every recipient.
    """
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    if length < 65536:
        return struct.pack("!BBH", 0x81, 126, length) + payload
    return struct.pack("!BBQ", 0x81, 127, length) + payload


class ConnectionClosed(Exception):
    """The WebSocket is closed; ``code`` is the close code (1006 when the TCP link broke)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"{code} {reason}".strip())
        self.code = code
        self.reason = reason


# -- HTTP ---------------------------------------------------------------------------------


@attrs.frozen
class Request:
    """The parsed head of one HTTP request."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[bytes, bytes]  # lower-cased names; repeated headers joined with ", "
    h11_connection: h11.Connection = attrs.field(repr=False, eq=False)

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")


class _HttpConnection(h11.Connection):
    """h11's server side, remembering the request method (h11 keeps its copy private):
    the answer to HEAD carries headers only."""

    request_method = b""


async def read_request(sock: socket.socket) -> Request | None:
    """Read one request head of at most ``MAX_HEAD_BYTES``. Returns None after answering
    malformed requests (400; 431 for an oversize head), or silently if the peer went away.
    The caller bounds the wait with a timeout."""
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
    """Answer a plain HTTP request and let the caller close the socket."""
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


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Send everything, waiting for the socket as needed. Raises OSError if the peer is gone."""
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


# -- WebSocket ------------------------------------------------------------------------------

Frame = str | bytes | bytearray
MessageHandler = Callable[[Frame], Awaitable[None]]


class WebSocket:
    """One server-side WebSocket. ``serve`` runs its receive loop; ``send`` is synchronous."""

    # Slots: an idle connection is mostly this object, and a dict of ~35 attributes costs
    # ~1.2 KB more than slots (measured: 8.2 -> 6.x KB per idle connection).
    __slots__ = (
        "__weakref__",
        "_backlog",
        "_backlog_frames",
        "_close_timeout",
        "_cork",
        "_cork_bytes",
        "_cork_frames",
        "_drained",
        "_failed",
        "_fast",
        "_flusher",
        "_fragment_bytes",
        "_fragmented",
        "_fragments",
        "_frame_burst",
        "_frame_rate",
        "_frame_stamp",
        "_frame_tokens",
        "_max_message",
        "_outbox_bytes",
        "_outbox_frames",
        "_partial",
        "_proto",
        "_queued_bytes",
        "_queued_frames",
        "_scope",
        "_short_read",
        "_sock",
        "_unparsed",
        "_writer_scope",
        "_writers",
        "close_code",
        "close_reason",
        "last_seen",
    )

    def __init__(
        self,
        sock: socket.socket,
        trailing: bytes,
        *,
        max_message_bytes: int,
        outbox_frames: int,
        close_timeout: float,
        flusher: Flusher,
        greeting: bytes = b"",
        outbox_bytes: int = 1024 * 1024,
        frame_rate: float = 200.0,
        frame_burst: int = 400,
    ) -> None:
        self._sock = sock
        self._flusher = flusher
        self._proto: _WsConnection | None = None  # see _wsproto
        # Inbound frames go through ``_take_simple`` until one needs wsproto (see there);
        # ``_partial`` holds the start of a frame the fast path is still receiving.
        self._fast = True
        self._partial = trailing
        self._max_message = max_message_bytes
        self._outbox_frames = outbox_frames
        self._outbox_bytes = outbox_bytes
        self._close_timeout = close_timeout
        # Unsent bytes, and how many frames each entry holds (an entry may join several).
        # Lists, not deques: at most outbox_frames entries, and an empty deque costs 760
        # bytes on every idle connection.
        self._backlog: list[bytes | memoryview] = []
        self._backlog_frames: list[int] = []
        self._queued_frames = 0
        self._queued_bytes = 0  # in the backlog, the entry being written included
        self._cork: list[bytes] | None = [greeting] if greeting else None
        self._cork_frames = 0
        self._cork_bytes = len(greeting)
        self._drained: trio.Event | None = None  # exists while a writer task runs
        self._writer_scope: trio.CancelScope | None = None
        self._writers: trio.Nursery | None = None  # set while serving
        self._scope = trio.CancelScope()
        self._fragments: list[Frame] = []
        self._fragment_bytes = 0
        self._fragmented = False  # a frame of the message being received has ended
        self._unparsed = False  # _collect stopped with input left (after _COLLECT_EVENTS)
        self._short_read = bool(not trailing)
        self._failed = False  # an inbound stream error: stop parsing, linger, close
        self.close_code: int | None = None  # set once closing starts (ours or theirs)
        self.close_reason = ""
        self.last_seen = trio.current_time()  # of the last recv: the frame budget's clock
        # The frame budget, a token bucket; off (rate 0) is a bucket that never empties.
        on = frame_rate > 0
        self._frame_rate = frame_rate if on else 0.0
        self._frame_burst = float(frame_burst) if on else math.inf
        self._frame_tokens = self._frame_burst
        self._frame_stamp = self.last_seen

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    # -- receiving ------------------------------------------------------------------------

    async def serve(self, on_message: MessageHandler, writers: trio.Nursery) -> int:
        """Receive until the connection ends, calling ``on_message`` for each complete
        message in order. Returns the close code. Cancellation ends the connection at once
        (the socket is closed; no close frame is sent). Never raises for peer behaviour.

        A writer task, when a backlog needs one, runs in ``writers`` (the server's connection
        nursery) rather than in a nursery of its own: a nursery per connection costs ~1 KB
        and two cancel scopes per handshake, and most connections never need a writer. It
        never outlives this call: the ``finally`` below stops it before the socket closes.
        """
        self._writers = writers
        try:
            if self._cork is not None:
                # The handshake response and greeting, in one send with the next burst.
                self._flusher.mark(self)
            if self._backlog:
                self._start_writer()
            with self._scope:
                await self._receive_loop(on_message)
                # Let the writer flush our last frames (the close answer), bounded by
                # the deadline that closing set.
                drained = self._drained
                if drained is not None:
                    await drained.wait()
        finally:
            self._writers = None
            drained = self._drained
            if drained is not None and self._writer_scope is not None:
                self._writer_scope.cancel()
                with trio.CancelScope(shield=True):
                    await drained.wait()  # at once: the writer is cancelled at its next wait
            self._cork = None  # what the flusher has not written yet has nowhere to go
            self._sock.close()
        return self.close_code if self.close_code is not None else ABNORMAL

    async def _receive_loop(self, on_message: MessageHandler) -> None:
        sock = self._sock
        messages: list[Frame] = []
        if self._partial:  # bytes that came with the handshake
            trailing, self._partial = self._partial, b""
            self._feed(trailing, messages)
        while True:
            still_open = self._fast or self._collect(messages)
            for message in messages:
                if self.close_code is not None:
                    break  # closing: the rest is ignored
                await on_message(message)
            messages.clear()
            if self._failed:
                await self._linger()
                return
            if not still_open:
                return
            if self._unparsed:
                await trio.lowlevel.checkpoint()
                continue
            if self._short_read:
                # The kernel had no more: wait for it rather than fail a recv (measured:
                # retrying at once tripled fan-out p99).
                await trio.lowlevel.wait_readable(sock)
            else:
                await trio.lowlevel.checkpoint()
            try:
                data = sock.recv(RECV_BYTES)
            except BlockingIOError:
                self._short_read = True
                continue
            except OSError:
                data = b""
            if not data:
                self._closed(ABNORMAL, "connection lost")
                return
            self._short_read = len(data) < RECV_BYTES
            self.last_seen = trio.current_time()
            self._feed(data, messages)

    def _feed(self, data: bytes, out: list[Frame]) -> None:
        """Parse received bytes: the fast path while it can, wsproto from then on."""
        if self._fast:
            if self.close_code is None:
                data = self._take_simple(data, out)
                if not data:
                    return
            else:  # closing: wsproto runs the closing handshake
                data, self._partial = self._partial + data, b""
            self._fast = False
        self._wsproto().receive_data(data)

    def _wsproto(self) -> _WsConnection:
        """wsproto's side of the connection, made when first needed: most connections never
        need it (it costs ~1.5 KB per connection)."""
        if self._proto is None:
            self._proto = _WsConnection(ConnectionType.SERVER)
        return self._proto

    def _take_simple(self, data: bytes, out: list[Frame]) -> bytes:
        """Unwrap the frames nearly every client sends -- whole, masked, final text or binary
        frames under 64 KiB, and pings and pongs -- appending their payloads to ``out`` (and
        answering pings). Returns the bytes from the first frame that is anything else, for
        wsproto; b"" if none, or once the frame budget is spent (the connection failed).

        Why: wsproto spends about 75 Python calls (24 us on the reference VM) on each
        frame, as much as the session spends acting on the message. Everything unusual
        -- fragments, closes, bad UTF-8 (1007), unmasked frames (1002), reserved bits,
        oversize frames -- is left to wsproto, which then runs the connection for good, so
        edge-case behaviour is wsproto's. tests/test_frames.py checks both paths agree. Pings
        stay here so that a flood of them costs ~1 us a frame up to the budget, not wsproto's
        24 us plus a send each.
        """
        if self._partial:
            data, self._partial = self._partial + data, b""
        end = len(data)
        limit = min(self._max_message, 65535)
        pos = 0
        while end - pos >= 2:
            first, second = data[pos], data[pos + 1]
            opcode = first & 0x0F
            # FIN set, no reserved bits, masked (clients must mask: RFC 6455 5.1).
            if first & 0xF0 != 0x80 or not second & 0x80 or opcode not in _FAST_OPCODES:
                return data[pos:]
            size = second & 0x7F
            head = 6
            if size >= 126:
                if size == 127:
                    return data[pos:]
                if end - pos < 4:
                    break
                size = (data[pos + 2] << 8) | data[pos + 3]
                if size < 126 or opcode > _BINARY:
                    return data[pos:]  # non-minimal length, or a long control frame: 1002
                head = 8
            if size > limit:
                return data[pos:]
            start = pos + head
            stop = start + size
            if stop > end:
                break
            if opcode > _BINARY:  # a ping or pong: it counts (any traffic counts as activity)
                if not self._take_frame():
                    self._fail(POLICY_VIOLATION, TOO_MANY_FRAMES)
                    return b""
                if opcode == _PING:
                    mask = data[start - 4 : start]
                    key = int.from_bytes((mask * (size // 4 + 1))[:size], "little")
                    payload = (int.from_bytes(data[start:stop], "little") ^ key).to_bytes(size, "little")
                    self.send(bytes((0x8A, size)) + payload)  # the pong, with what is pending
                pos = stop
                continue
            mask = data[start - 4 : start]
            payload = data[start:stop]
            if size <= 2048:
                key = int.from_bytes((mask * (size // 4 + 1))[:size], "little")
                payload = (int.from_bytes(payload, "little") ^ key).to_bytes(size, "little")
            else:  # wsproto's masker is faster on long payloads
                payload = bytes(XorMaskerSimple(mask).process(bytearray(payload)))
            if opcode == _TEXT and not payload.isascii():
                try:
                    payload.decode()
                except UnicodeDecodeError:
                    return data[pos:]  # wsproto closes with 1007
            out.append(payload)
            pos = stop
        if pos < end:
            self._partial = data[pos:]  # under one frame of at most 64 KiB
        return b""

    def _take_frame(self) -> bool:
        """Take one frame from the frame budget; False when it is spent."""
        now = self.last_seen
        tokens = self._frame_tokens + (now - self._frame_stamp) * self._frame_rate
        self._frame_stamp = now
        if tokens > self._frame_burst:
            tokens = self._frame_burst
        self._frame_tokens = tokens = tokens - 1.0
        return tokens >= 0.0

    def _collect(self, out: list[Frame]) -> bool:
        """Turn wsproto events into complete messages. False when the connection is over.
        Stops after ``_COLLECT_EVENTS`` events, setting ``_unparsed``: call again (after a
        checkpoint) for the rest."""
        proto = self._wsproto()
        events = 0
        for event in itertools.islice(proto.events(), _COLLECT_EVENTS):
            events += 1
            if isinstance(event, (TextMessage, BytesMessage)):
                if event.frame_finished and (self._fragmented or not event.message_finished):
                    # A fragment ends (an event may carry part of a frame): it counts. A
                    # whole message in one frame is left to the message rate limit.
                    self._fragmented = not event.message_finished
                    if not self._take_frame():
                        self._fail(POLICY_VIOLATION, TOO_MANY_FRAMES)
                        return False
                if self.close_code is not None:
                    continue  # closing: the rest is ignored
                data = event.data
                size = len(data) if type(data) is not str or data.isascii() else len(data.encode())
                if event.message_finished and not self._fragments:
                    if size > self._max_message:
                        self._fail(MESSAGE_TOO_BIG, "message too big")
                        return False
                    out.append(data)
                    continue
                self._fragment_bytes += size
                if self._fragment_bytes > self._max_message:
                    self._fragments.clear()
                    self._fail(MESSAGE_TOO_BIG, "message too big")
                    return False
                if size:  # skip empty fragments (legal): a flood of them would grow the list
                    self._fragments.append(data)
                if event.message_finished:
                    joined = (
                        "".join(self._fragments)  # type: ignore[arg-type]
                        if isinstance(self._fragments[0], str)
                        else b"".join(self._fragments)  # type: ignore[arg-type]
                    )
                    self._fragments.clear()
                    self._fragment_bytes = 0
                    out.append(joined)
            elif isinstance(event, Ping):
                if not self._take_frame():
                    self._fail(POLICY_VIOLATION, TOO_MANY_FRAMES)
                    return False
                if proto.state is ConnectionState.OPEN:
                    # Through the bounded outbox, after what is pending (the handshake
                    # response may still be): a peer that floods pings and never reads its
                    # pongs is a slow consumer like any other (1013).
                    self.send(bytes((0x8A, len(event.payload))) + event.payload)
            elif isinstance(event, CloseConnection):
                return self._on_close_event(event)
            elif isinstance(event, Pong) and not self._take_frame():
                self._fail(POLICY_VIOLATION, TOO_MANY_FRAMES)  # (any traffic is activity)
                return False
        self._unparsed = events == _COLLECT_EVENTS
        return True

    def _on_close_event(self, event: CloseConnection) -> bool:
        proto = self._wsproto()
        state = proto.state
        if state is ConnectionState.REMOTE_CLOSING:
            # The peer closes: answer (after what we sent before), then we are done. Its
            # close counts too: over the budget, the answer is 1008.
            if not self._take_frame():
                event = CloseConnection(code=POLICY_VIOLATION, reason=TOO_MANY_FRAMES)
            self.flush()
            self._push(proto.send(event.response()), 1, bounded=False)
            self._closed(event.code, event.reason or "")
            return False
        if state is ConnectionState.CLOSED:
            # The peer answered our close.
            self._closed(self.close_code or event.code, self.close_reason)
            return False
        # A protocol violation wsproto detected (bad UTF-8 -> 1007, bad framing -> 1002).
        # wsproto's parser is dead after it: nothing more can be read.
        self._fail(int(event.code), event.reason or "")
        return False

    # -- sending ---------------------------------------------------------------------------

    def send(self, data: bytes, frames: int = 1) -> None:
        """Send ``data``: ``frames`` pre-built frames, possibly joined into one buffer. It
        waits in the connection, and the flusher writes it after this scheduler pass with
        whatever else the connection was sent. Never blocks; ignored once the connection is
        closing. A client whose backlog would pass ``outbox_frames`` or ``outbox_bytes`` is
        closed with 1013."""
        if self.close_code is not None:
            return
        cork = self._cork
        if cork is None:
            self._cork = [data]
            self._cork_frames = frames
            self._cork_bytes = len(data)
            self._flusher.mark(self)
        else:
            cork.append(data)
            self._cork_frames += frames
            self._cork_bytes += len(data)
            if self._cork_frames >= self._outbox_frames or self._cork_bytes >= self._outbox_bytes:
                # Many senders at one client in one pass: write now, so what waits here
                # stays bounded like the backlog (which closes a client not reading).
                self.flush()

    def send_now(self, data: bytes, frames: int = 1) -> None:
        """``send``, written at once unless frames are pending (then behind them): for a
        caller that writes to many connections in one loop (a room's broadcaster), a burst
        already, where going through the flusher cost 1 x 500 fan-out 10 % (5 runs)."""
        if self._cork is None and self.close_code is None:
            self._push(data, frames)
        else:
            self.send(data, frames)  # behind what is pending, or ignored while closing

    def _push(self, data: bytes, frames: int, *, bounded: bool = True) -> None:
        """Write-through: hand ``data`` to the kernel at once unless a backlog exists (order),
        and queue what the kernel did not take. ``bounded``: a backlog over ``outbox_frames``
        frames, or over ``outbox_bytes`` bytes behind the entry being written, closes the
        connection with 1013 (close frames are unbounded: they must go out)."""
        backlog = self._backlog
        if backlog:
            if bounded and (
                self._queued_frames + frames > self._outbox_frames
                or self._queued_bytes - len(backlog[0]) + len(data) > self._outbox_bytes
            ):
                self.close(TRY_AGAIN_LATER, "client too slow")
                return
            self._queue(data, frames)
            return
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.abort()
            return
        if sent < len(data):
            self._queue(memoryview(data)[sent:] if sent else data, frames)

    def flush(self) -> None:
        """Write the frames ``send`` queued (the flusher calls this after the scheduler pass
        in which they were sent)."""
        cork = self._cork
        if cork is None:
            return
        self._cork = None
        if cork:
            frames, self._cork_frames = self._cork_frames, 0
            self._push(cork[0] if len(cork) == 1 else b"".join(cork), frames)

    def send_text(self, payload: bytes) -> None:
        self.send(text_frame(payload))

    def ping(self) -> None:
        self.send(PING_FRAME)

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake with ``code``; the peer has ``close_timeout`` seconds to
        answer before the socket is dropped. Idempotent; never blocks."""
        if self.close_code is not None:
            return
        self.flush()  # what was sent before the close goes out before it
        self.close_code = code
        self.close_reason = reason
        if code == TRY_AGAIN_LATER and len(self._backlog) > 1:
            # The client is not reading: drop what it would never read in time, but finish
            # the entry in flight so the close frame stays parseable.
            head, head_frames = self._backlog[0], self._backlog_frames[0]
            self._backlog.clear()
            self._backlog_frames.clear()
            self._backlog.append(head)
            self._backlog_frames.append(head_frames)
            self._queued_frames = head_frames
            self._queued_bytes = len(head)
        proto = self._wsproto()
        if proto.state is ConnectionState.OPEN:
            self._push(proto.send(CloseConnection(code=code, reason=reason)), 1, bounded=False)
        self._scope.deadline = min(self._scope.deadline, trio.current_time() + self._close_timeout)

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection: close frame ``code`` (unless closing already), then linger."""
        self.close(code, reason)
        self._failed = True

    async def _linger(self) -> None:
        """Flush our close frame, send FIN, and discard input until the peer's EOF. Bounded
        by the deadline ``close`` set; discarded bytes never reach wsproto (no buffering)."""
        sock = self._sock
        drained = self._drained
        if drained is not None:
            await drained.wait()
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                if not sock.recv(RECV_BYTES):
                    return
            except BlockingIOError:
                continue
            except OSError:
                return

    def abort(self) -> None:
        """Drop the connection now, without a closing handshake."""
        if self.close_code is None:
            self.close_code = ABNORMAL
        self._scope.cancel()

    def _closed(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        # Give the writer a moment to flush our last frame (the close answer), then stop.
        if self._backlog:
            self._scope.deadline = min(self._scope.deadline, trio.current_time() + self._close_timeout)

    def _queue(self, data: bytes | memoryview, frames: int) -> None:
        self._backlog.append(data)
        self._backlog_frames.append(frames)
        self._queued_frames += frames
        self._queued_bytes += len(data)
        self._start_writer()

    def _start_writer(self) -> None:
        if self._drained is None and self._writers is not None:
            self._drained = trio.Event()
            self._writer_scope = trio.CancelScope()
            self._writers.start_soon(self._drain)

    async def _drain(self) -> None:
        """Writer task: runs only while a backlog exists (most connections never need one).
        It runs in the server's nursery, so nothing it meets may escape: a failure here
        ends this connection, never the server."""
        assert self._writer_scope is not None
        try:
            with self._writer_scope:
                await self._write_backlog()
        except Exception:
            log.exception("event=writer_error")
            self.abort()
        finally:
            drained, self._drained = self._drained, None
            if drained is not None:
                drained.set()

    async def _write_backlog(self) -> None:
        sock = self._sock
        backlog = self._backlog
        while backlog:
            await trio.lowlevel.wait_writable(sock)
            chunk = [backlog[i] for i in range(min(len(backlog), _WRITEV_MAX))]
            try:
                sent = sock.sendmsg(chunk)
            except BlockingIOError:
                continue
            except OSError:
                backlog.clear()
                self._backlog_frames.clear()
                self._queued_frames = 0
                self._queued_bytes = 0
                self.abort()
                return
            self._queued_bytes -= sent
            while sent:
                head = backlog[0]
                if sent >= len(head):
                    sent -= len(head)
                    del backlog[0]
                    self._queued_frames -= self._backlog_frames.pop(0)
                else:
                    backlog[0] = memoryview(head)[sent:]
                    sent = 0


def websocket_close_reason(code: int) -> str:
    try:
        return CloseReason(code).name.lower()
    except ValueError:
        return str(code)
