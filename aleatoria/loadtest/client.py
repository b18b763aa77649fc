"""One load-test client connection: open, count what goes wrong, send and receive JSON.

Every connection failure is counted under ``conn.*`` rather than raised, because a
load test must report a server that refuses or drops clients, not crash on it:
``conn.failed.<why>`` (handshake: ``http_503``, ``timeout``, ``refused``…),
``conn.closed_by_server.<code>`` (the server closed a live connection before we
did), ``conn.close_timeout`` (our close handshake was not answered).
"""

from __future__ import annotations

import errno
import math
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    DisconnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from aleatoria.loadtest.context import RunContext
from aleatoria.loadtest.payload import now_ns

Message = dict[str, Any]
# Deep enough that a burst of fan-out deliveries does not stall the socket reader.
MESSAGE_QUEUE_SIZE = 256
DISCONNECT_TIMEOUT = 5.0


def ws_url(base: str, user: str, room: str | None, level: int = 1) -> str:
    url = f"{base.rstrip('/')}/ws?userId={quote(user)}"
    if room is not None:
        url += f"&room={quote(room)}"
    if level == 2:
        url += "&v=2"
    return url


def ssl_context(ctx: RunContext) -> ssl.SSLContext | None:
    if not ctx.options.url.startswith("wss:"):
        return None
    context = ssl.create_default_context()
    if ctx.options.insecure:
        # --insecure: a local server with a self-signed certificate.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def send(ws: WebSocketConnection, message: Message) -> None:
    """Send one JSON text frame. Raises ConnectionClosed if the connection is gone."""
    await ws.send_message(orjson.dumps(message).decode())


async def receive(ws: WebSocketConnection) -> Message:
    """The next frame as a JSON object. Raises ConnectionClosed; non-objects become {}."""
    raw = await ws.get_message()
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return message if isinstance(message, dict) else {}


def note_error(ctx: RunContext, message: Message) -> str | None:
    """Count a server ``error``/``error_response`` as ``error.<code>``; return the code."""
    kind = message.get("type")
    if kind == "error_response":
        code = "invalid_structure"
    elif kind == "error":
        payload = message.get("payload")
        code = str(payload.get("code", "unknown")) if isinstance(payload, dict) else "unknown"
    else:
        return None
    ctx.stats.inc(f"error.{code}")
    return code


async def run_client(
    ctx: RunContext,
    user: str,
    room: str | None,
    body: Callable[[WebSocketConnection], Awaitable[None]],
) -> bool:
    """Connect as ``user`` (auto-joining ``room``), run ``body(ws)``, close.

    Returns whether the connection opened. Connection failures are counted, not raised;
    any other exception from ``body`` propagates. Cancellation propagates.
    """
    url = ws_url(ctx.options.url, user, room, ctx.options.level)
    ctx.stats.inc("conn.attempted")
    opened = False
    token = object()
    # The limiter bounds handshakes in flight (not open connections), so a large
    # ``conns`` run does not hit the server's accept queue all at once.
    await ctx.connect_limiter.acquire_on_behalf_of(token)
    held = True
    started = now_ns()
    # trio-websocket 0.12 starts the connection's reader before the handshake, and on its
    # connect_timeout waits for that reader, which only ends when the server closes the
    # socket: a server that accepts but never answers held the run until the hard deadline.
    # This scope ends the wait at the same timeout; it is lifted once the handshake is done.
    # (The cancelled reader leaves its socket to be closed when the connection object is
    # dropped, at once by reference count, with a ResourceWarning.)
    connecting = trio.CancelScope(deadline=trio.current_time() + ctx.options.connect_timeout)
    try:
        with connecting:
            async with open_websocket_url(
                url,
                ssl_context(ctx),
                message_queue_size=MESSAGE_QUEUE_SIZE,
                connect_timeout=ctx.options.connect_timeout,
                disconnect_timeout=DISCONNECT_TIMEOUT,
            ) as ws:
                connecting.deadline = math.inf
                ctx.connect_limiter.release_on_behalf_of(token)
                held = False
                opened = True
                done = now_ns()
                ctx.stats.observe("connect", done - started, done)
                ctx.stats.inc("conn.opened")
                ctx.open_connections += 1
                try:
                    await body(ws)
                except BaseExceptionGroup as group:
                    # A session's reader and sender run in a nursery, so a close reaches us
                    # wrapped in a group — possibly twice, once per task. Both are the same
                    # event: count it once, let anything else propagate.
                    closed, rest = group.split(ConnectionClosed)
                    if closed is not None:
                        _note_closed(ctx, _first_leaf(closed))
                    if rest is not None:
                        raise rest from None
                finally:
                    ctx.open_connections -= 1
                    if ws.closed is not None:
                        await _close_transport(ws)
        if connecting.cancelled_caught and not opened:
            ctx.stats.inc("conn.failed.timeout")
    except ConnectionRejected as exc:
        ctx.stats.inc(f"conn.failed.http_{exc.status_code}")
    except ConnectionTimeout:
        ctx.stats.inc("conn.failed.timeout")
    except DisconnectionTimeout:
        ctx.stats.inc("conn.close_timeout")
    except HandshakeError as exc:
        ctx.stats.inc(f"conn.failed.{failure_reason(exc)}")
    except ConnectionClosed as exc:
        _note_closed(ctx, exc)
    except OSError as exc:
        ctx.stats.inc(f"conn.failed.{failure_reason(exc)}" if not opened else "conn.broken")
    finally:
        if held:
            ctx.connect_limiter.release_on_behalf_of(token)
    return opened


def failure_reason(exc: BaseException) -> str:
    """``refused`` when every connection attempt behind ``exc`` was refused (nothing
    listening), else ``network``.

    trio-websocket wraps the error in HandshakeError, and trio's ``open_tcp_stream``
    raises ``OSError('all attempts to connect … failed')`` whose cause is a group of one
    error per address tried; so the causes and the group's leaves are looked through.
    """
    leaves: list[BaseException] = []
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        elif current.__cause__ is not None:
            pending.append(current.__cause__)
        else:
            leaves.append(current)
    refused = [leaf for leaf in leaves if isinstance(leaf, OSError) and leaf.errno == errno.ECONNREFUSED]
    return "refused" if leaves and len(refused) == len(leaves) else "network"


async def _close_transport(ws: WebSocketConnection) -> None:
    """Close the TCP stream of a connection the *server* closed.

    trio-websocket 0.12 leaves a client's stream open when the peer closed first (its
    ``aclose()`` returns early once a close reason is set), so the socket would be left
    to the garbage collector (a ResourceWarning). ``aclose_forcefully`` is immediate
    and safe under cancellation; the library's reader then sees a closed stream and ends.
    """
    await trio.aclose_forcefully(ws._stream)


def _note_closed(ctx: RunContext, exc: BaseException) -> None:
    reason = getattr(exc, "reason", None)
    code = reason.code if reason is not None else 0
    if ctx.phase in {"closing", "done"}:
        ctx.stats.inc("conn.closed_during_close")
    else:
        ctx.stats.inc(f"conn.closed_by_server.{code}")


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def wait_for(
    ws: WebSocketConnection,
    ctx: RunContext,
    accept: Callable[[Message], bool],
) -> Message:
    """Read until a message satisfies ``accept``; server errors on the way are counted.

    The caller bounds the wait (``trio.fail_after``/``move_on_after``).
    Raises ConnectionClosed.
    """
    while True:
        message = await receive(ws)
        if accept(message):
            return message
        note_error(ctx, message)


async def registered(ws: WebSocketConnection, ctx: RunContext) -> bool:
    """Ping and wait for the pong, which proves the server has registered this connection
    (a DM or match aimed at it from now on reaches it live). False, counted as
    ``conn.ready_timeout``, when no pong comes within ``--connect-timeout``."""
    await send(ws, {"type": "ping"})
    with trio.move_on_after(ctx.options.connect_timeout):
        await wait_for(ws, ctx, lambda m: m.get("type") == "pong")
        return True
    ctx.stats.inc("conn.ready_timeout")
    return False
