"""One WebSocket connection's I/O: its receive loop, wsproto when needed, and its outbox.

How this works. Every connection is a non-blocking stdlib socket; we wait on it with
``trio.lowlevel.wait_readable``/``wait_writable`` (trio's own primitives) and call
``recv``/``send`` directly, which costs a fraction of ``trio.SocketStream``'s per-call
bookkeeping. Inbound bytes go through the frame codec's fast path
(``aleatoria.frames.FrameReader``) until the first frame that needs wsproto; from then on
``wsproto.Connection`` runs the connection (created only then, or to send a close). Both
paths spend the same frame budget: a connection over it is failed with 1008 and nothing
more it sent is parsed (so a ping flood gets at most ``frame_burst`` pongs).

Outbound vocabulary -- which verb to use when:

- ``send(data, frames)``: the default. The frames wait in the connection until the end of
  the scheduler pass, then the flusher (``aleatoria.flusher``) writes everything the
  connection was sent in that pass in one system call (a reply and a relay join).
- ``send_now(data, frames)``: for a caller that is a burst already, writing to many
  connections in one loop (a room's broadcaster, a match announcement): written at once,
  behind any frames pending for the flusher so order holds.
- ``flush()``: write what ``send`` left pending now; the flusher calls it after the pass
  (and ``send`` itself once the pending frames reach the outbox bound).
- ``close(code, reason)``: flush, then the closing handshake (``abort()`` drops the socket
  without one). ``send_text`` and ``ping`` are ``send`` of one frame built here.

Every verb is synchronous and never blocks. When the kernel buffer is full the rest waits
in a bounded backlog drained by a writer task started on demand (in the server's
connection nursery; ``serve`` stops it); a backlog that reaches its bound --
``outbox_frames`` frames, or ``outbox_bytes`` bytes behind the entry being written (so one
large history reply to a client that reads is fine) -- means the client is not reading: it
is disconnected with 1013 rather than silently losing messages. Frames waiting for the
flusher are bounded the same way (written at once when they reach either bound).

Closing: ``close(code)`` sends the close frame and gives the peer ``close_timeout`` seconds
to answer before the socket is dropped; ``serve`` returns once the connection is over.
Inbound stream errors (bad framing 1002, bad UTF-8 1007, a message over the limit 1009, the
frame budget 1008) *fail* the connection instead (RFC 6455 7.1.7): after the close frame
nothing more is parsed; we send FIN and discard input until the peer's EOF (a "lingering
close", bounded by the same deadline), since closing with unread input would reset the
connection and could destroy the close frame in flight. Waiting for a close answer would be
pointless there: a peer in the middle of a 2**40-byte frame cannot send one.
"""

from __future__ import annotations

import itertools
import logging
import socket
from collections.abc import Awaitable, Callable

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

from aleatoria.flusher import Flusher
from aleatoria.frames import (
    ABNORMAL,
    MESSAGE_TOO_BIG,
    PING_FRAME,
    POLICY_VIOLATION,
    TOO_MANY_FRAMES,
    TRY_AGAIN_LATER,
    FrameReader,
    Message,
    text_frame,
)

__all__ = ["MessageHandler", "WebSocket"]

log = logging.getLogger("aleatoria.connection")

RECV_BYTES = 65536
# wsproto events handled before other tasks may run: 64 small frames take ~1 ms of wsproto,
# where a recv of 64 KiB holds 10,000 empty frames (and a frame budget's burst, 400 of them).
_COLLECT_EVENTS = 64
_WRITEV_MAX = 512  # buffers per sendmsg call, well under IOV_MAX

MessageHandler = Callable[[Message], Awaitable[None]]
# Called after the messages of one read, before waiting for more (see ``serve``).
IdleHandler = Callable[[], Awaitable[None]]


class WebSocket:
    """One server-side WebSocket. ``serve`` runs its receive loop; the outbound verbs
    (module docstring) are synchronous."""

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
        "_deadline",
        "_drained",
        "_dropped",
        "_failed",
        "_fast",
        "_flusher",
        "_fragment_bytes",
        "_fragmented",
        "_fragments",
        "_max_message",
        "_outbox_bytes",
        "_outbox_frames",
        "_proto",
        "_queued_bytes",
        "_queued_frames",
        "_reader",
        "_short_read",
        "_sock",
        "_timer",
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
        # Inbound frames go through the reader's fast path until one needs wsproto; the
        # reader keeps the frame budget for both paths, and holds the bytes that came with
        # the handshake until the receive loop starts.
        self._fast = True
        self.last_seen = trio.current_time()  # of the last recv: the frame budget's clock
        self._reader = FrameReader(
            max_message_bytes=max_message_bytes,
            frame_rate=frame_rate,
            frame_burst=frame_burst,
            now=self.last_seen,
            partial=trailing,
        )
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
        # Closing: when the connection is dropped if it has not ended by then (``close``),
        # and the scope of the task that drops it (``_expire``). No cancel scope around the
        # receive loop: entering it and living inside it cost 27k of a connect's 574k
        # instructions (in process; docs/performance.md, "Session 10").
        self._deadline: float | None = None
        self._timer: trio.CancelScope | None = None
        self._dropped = False  # ``abort``: nothing waits on the socket any more
        self._fragments: list[Message] = []
        self._fragment_bytes = 0
        self._fragmented = False  # a frame of the message being received has ended
        self._unparsed = False  # _collect stopped with input left (after _COLLECT_EVENTS)
        self._short_read = bool(not trailing)
        self._failed = False  # an inbound stream error: stop parsing, linger, close
        self.close_code: int | None = None  # set once closing starts (ours or theirs)
        self.close_reason = ""

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    # -- receiving ------------------------------------------------------------------------

    async def serve(
        self, on_message: MessageHandler, writers: trio.Nursery, on_idle: IdleHandler | None = None
    ) -> int:
        """Receive until the connection ends, calling ``on_message`` for each complete
        message in order, and ``on_idle`` once the messages of one read are handled (a
        session may hold a request back to join it with the next one). Returns the close
        code. Cancellation ends the connection at once (the socket is closed; no close frame
        is sent). Never raises for peer behaviour.

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
            self._start_timer()  # closed before it was served
            try:
                await self._receive_loop(on_message, on_idle)
                # Let the writer flush our last frames (the close answer), bounded by
                # the deadline that closing set (``_expire`` stops the writer).
                drained = self._drained
                if drained is not None:
                    await drained.wait()
            except trio.ClosedResourceError:
                pass  # dropped (``abort``) while waiting on the socket
        finally:
            self._writers = None
            self._dropped = True  # what still runs (a timer woken already) leaves it alone
            if self._timer is not None:
                self._timer.cancel()
            drained = self._drained
            if drained is not None and self._writer_scope is not None:
                self._writer_scope.cancel()
                with trio.CancelScope(shield=True):
                    await drained.wait()  # at once: the writer is cancelled at its next wait
            self._cork = None  # what the flusher has not written yet has nowhere to go
            self._sock.close()
        return self.close_code if self.close_code is not None else ABNORMAL

    async def _receive_loop(self, on_message: MessageHandler, on_idle: IdleHandler | None) -> None:
        sock = self._sock
        # Both lists live as long as the loop, reused for every recv.
        messages: list[Message] = []
        pongs: list[bytes] = []
        if self._reader.partial:  # bytes that came with the handshake
            self._feed(self._reader.take_partial(), messages, pongs)
        while True:
            still_open = self._fast or self._collect(messages)
            if messages:
                for message in messages:
                    if self.close_code is not None:
                        break  # closing: the rest is ignored
                    await on_message(message)
                messages.clear()
                if on_idle is not None:
                    await on_idle()
            if self._failed:
                await self._linger()
                return
            if not still_open:
                return
            if self._dropped:
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
            self._feed(data, messages, pongs)

    def _feed(self, data: bytes, out: list[Message], pongs: list[bytes]) -> None:
        """Parse received bytes: the fast path while it can, wsproto from then on. Pings the
        fast path took are answered here, through the bounded outbox after what is pending:
        a peer that floods pings and never reads its pongs is a slow consumer (1013)."""
        if self._fast:
            if self.close_code is None:
                rest = self._reader.parse(data, self.last_seen, out, pongs)
                if pongs:
                    for pong in pongs:
                        self.send(pong)
                    pongs.clear()
                if not rest:
                    return
                if isinstance(rest, int):  # the frame budget is spent: the only code it returns
                    self._fail(rest, TOO_MANY_FRAMES)
                    return
                data = rest
            else:  # closing: wsproto runs the closing handshake
                data = self._reader.take_partial() + data
            self._fast = False
        self._wsproto().receive_data(data)

    def _wsproto(self) -> _WsConnection:
        """wsproto's side of the connection, made when first needed: most connections never
        need it (it costs ~1.5 KB per connection)."""
        if self._proto is None:
            self._proto = _WsConnection(ConnectionType.SERVER)
        return self._proto

    def _collect(self, out: list[Message]) -> bool:
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
                    if not self._reader.take_frame(self.last_seen):
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
                if not self._reader.take_frame(self.last_seen):
                    self._fail(POLICY_VIOLATION, TOO_MANY_FRAMES)
                    return False
                if proto.state is ConnectionState.OPEN:
                    # Through the bounded outbox, after what is pending (the handshake
                    # response may still be): a peer that floods pings and never reads its
                    # pongs is a slow consumer like any other (1013).
                    self.send(bytes((0x8A, len(event.payload))) + event.payload)
            elif isinstance(event, CloseConnection):
                return self._on_close_event(event)
            elif isinstance(event, Pong) and not self._reader.take_frame(self.last_seen):
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
            if not self._reader.take_frame(self.last_seen):
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
        self._close_by_deadline()

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
        if self._dropped:
            return
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        while not self._dropped:  # dropped while not waiting: no new wait
            await trio.lowlevel.wait_readable(sock)  # ClosedResourceError once dropped
            try:
                if not sock.recv(RECV_BYTES):
                    return
            except BlockingIOError:
                continue
            except OSError:
                return

    def abort(self) -> None:
        """Drop the connection now, without a closing handshake: the writer stops, and a
        wait of the receive loop on the socket ends (``serve`` returns; a message being
        handled is finished first)."""
        if self._dropped:
            return
        self._dropped = True
        if self.close_code is None:
            self.close_code = ABNORMAL
        if self._writer_scope is not None:
            self._writer_scope.cancel()
        # The socket is closed by ``serve`` right after: nothing waits on it again.
        trio.lowlevel.notify_closing(self._sock)

    def _closed(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        # Give the writer a moment to flush our last frame (the close answer), then stop.
        if self._backlog:
            self._close_by_deadline()

    def _close_by_deadline(self) -> None:
        """Drop the connection ``close_timeout`` from now unless it ended (the first
        deadline holds)."""
        if self._deadline is None:
            self._deadline = trio.current_time() + self._close_timeout
            self._start_timer()

    def _start_timer(self) -> None:
        if self._deadline is not None and self._timer is None and self._writers is not None:
            self._timer = trio.CancelScope()
            self._writers.start_soon(self._expire)

    async def _expire(self) -> None:
        """Timer task (in the server's connection nursery, like the writer): drops the
        connection at its closing deadline; ``serve`` cancels it when the connection ends."""
        assert self._timer is not None and self._deadline is not None
        with self._timer:
            await trio.sleep_until(self._deadline)
            self.abort()

    def _queue(self, data: bytes | memoryview, frames: int) -> None:
        self._backlog.append(data)
        self._backlog_frames.append(frames)
        self._queued_frames += frames
        self._queued_bytes += len(data)
        self._start_writer()

    def _start_writer(self) -> None:
        if self._drained is None and self._writers is not None and not self._dropped:
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
        except trio.ClosedResourceError:
            pass  # dropped (``abort``) while waiting to write
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
