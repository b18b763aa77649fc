"""The server: listener, HTTP routing, connection lifecycle, graceful shutdown.

The nursery tree, by lifetime: store -> hub (room broadcasters) -> flusher (writes what
connections were sent, once per scheduler pass) -> supervisor, listener and one task per
connection. ``serve`` runs it until cancelled, then shuts down gracefully: stop
accepting, close every WebSocket with 1001, let the closing handshakes finish, flush the
store, all within ``shutdown_timeout``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket
import time
from collections import Counter, deque
from collections.abc import Iterator
from importlib import resources
from typing import cast

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from aleatoria import admin, metrics, overview
from aleatoria import messages as m
from aleatoria.auth import token_expiry, token_problem
from aleatoria.config import Config
from aleatoria.connection import WebSocket
from aleatoria.flusher import Flusher, open_flusher
from aleatoria.frames import ABNORMAL, BANNED, GOING_AWAY, REPLACED, TOKEN_EXPIRED
from aleatoria.http import Request, accept_websocket, answer_http, handshake_problem, read_request, send_http
from aleatoria.hub import Client, Hub, open_hub
from aleatoria.ice import ice_servers
from aleatoria.limits import RateLimiter, id_problem
from aleatoria.moderation import Moderation
from aleatoria.origin import OriginPolicy
from aleatoria.resume import (
    KEEP_CODES,
    NO_SUCH_TOKEN,
    OVERFLOW,
    UNKNOWN,
    KeptSession,
    ResumeCollector,
    Resumes,
)
from aleatoria.resume_remote import RemoteResumes
from aleatoria.router import Router, new_message_id
from aleatoria.safety import Admission
from aleatoria.searching import search_forever
from aleatoria.session import Session, expires_at
from aleatoria.store import Store, open_store
from aleatoria.supervisor import supervise
from aleatoria.webhook import Webhook

log = logging.getLogger("aleatoria.server")

DEFAULT_ROOM = "Lobby"
_CLEANUP_TIMEOUT = 5.0
# Sockets accepted beyond ``max_connections`` to answer /health and /metrics (and refuse
# upgrades with 503) while the server is full; past these, new sockets are closed at once.
_HTTP_RESERVE = 64
# Close codes of 3000 and up that label aleatoria_disconnects_total: ours. A client's own
# (3000-4999, its choice) count as "other": one client could add 2,000 series otherwise.
_APPLICATION_CODES = 3000
_OUR_CODES = frozenset({REPLACED, TOKEN_EXPIRED, BANNED})
# Descriptors besides the connections: listeners, Redis connections, the log, the imports.
_SPARE_FDS = 100


def _load_page() -> bytes | None:
    try:
        return resources.files("aleatoria").joinpath("web/index.html").read_bytes()
    except (FileNotFoundError, OSError):
        return None


def open_listener(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening socket (IPv6 when ``host`` is an IPv6 literal). Accepted
    sockets inherit its TCP_NODELAY (Linux copies it), which saves a system call per
    connection: small frames must leave at once, never wait for Nagle's algorithm."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(4096)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Server:
    """One running server process. Use ``serve`` rather than this class directly."""

    def __init__(self, config: Config, store: Store, hub: Hub, flusher: Flusher) -> None:
        self.config = config
        self.store = store
        self.hub = hub
        self.flusher = flusher
        self.router = Router(hub, store)
        self.origins = OriginPolicy(
            config.allowed_origins, config.require_origin, config.effective_allowed_hosts
        )
        self.page = _load_page()
        self.started = time.monotonic()
        self.accepting = True
        self.connections = 0  # TCP connections, handshakes included
        # Sockets whose request head has not come yet: a shutdown ends them at once rather
        # than waiting out their handshake timeout (one idle preconnect held it 9 s).
        self._waiting_heads: set[socket.socket] = set()
        # The per-IP cap counts sockets from accept (half-open ones too), by peer address;
        # behind a proxy (client_ip_header) the peer is the proxy, so sessions are counted
        # by the header's address once the head is read.
        self.sockets_per_ip: Counter[str] = Counter()
        self.per_ip: Counter[str] = Counter()  # WebSocket sessions by client IP (header)
        self.kept_per_ip: Counter[str] = Counter()  # level-2 sessions kept for a resume, by IP
        self.refused_at_accept = 0
        self.stats = hub.stats
        webhook = None
        if config.report_webhook and config.admin_token:
            webhook = Webhook(
                config.report_webhook, config.admin_token, self.stats, capacity=config.webhook_queue
            )
        self.moderation = Moderation(store, self.router, self.stats, webhook)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(metrics.ServerCollector(self.stats, self._counters, self._gauges))
        self.registry.register(_Forward(metrics.REGISTRY))
        # Level 2 (PROTOCOL.md section 15): resume tokens and dropped sessions kept for them.
        self.resumes = Resumes(config.resume_window, config.outbox_frames, config.outbox_bytes)
        self.remote = RemoteResumes(hub, self.router, self.resumes)
        self.registry.register(ResumeCollector(self.resumes))
        self._all_closed = trio.Event()
        self._turns: dict[str, _Turn] = {}
        self.accept_scope = trio.CancelScope()
        self._tasks: trio.Nursery  # set by accept_forever, before any connection exists

    # -- accepting -------------------------------------------------------------------------

    async def accept_forever(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        self._tasks = nursery  # connections, and their writer tasks when they need one
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(256):  # bounded burst, then let the connections run
                try:
                    sock, addr = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.warning("event=accept_failed error=%s", exc.strerror)
                        await trio.sleep(0.1)
                        break
                    raise
                ip = addr[0]
                if self._over_socket_caps(ip):
                    self.refused_at_accept += 1
                    _refuse_now(sock)
                    continue
                sock.setblocking(False)
                nursery.start_soon(self._connection, sock, ip, self._count_socket(ip))

    async def serve_connection(self, sock: socket.socket, addr: str = "127.0.0.1") -> None:
        """Serve one connected socket as if the listener had accepted it from ``addr``: the
        same handler (HTTP routes, upgrade, session), without a listener. The in-memory test
        tier hands it one end of ``socket.socketpair()`` (see ``serve_unlistened``). Returns
        when the connection is over; cancellation closes the socket."""
        sock.setblocking(False)
        await self._connection(sock, addr, self._count_socket(addr))

    def _count_socket(self, ip: str) -> bool:
        """Count a socket just accepted from ``ip`` (``_connection`` uncounts it); whether it
        is within ``max_connections`` in the order accepted (see ``_refusal``)."""
        self.connections += 1
        self.sockets_per_ip[ip] += 1
        return self.connections <= self.config.max_connections

    def _over_socket_caps(self, ip: str) -> bool:
        """Whether a socket just accepted from ``ip`` is over the caps, counted from accept
        (PROTOCOL.md section 16: half-open connections count)."""
        config = self.config
        if self.connections >= config.max_connections + _HTTP_RESERVE:
            return True
        per_ip = config.max_connections_per_ip
        return bool(per_ip) and not config.client_ip_header and self.sockets_per_ip[ip] >= per_ip

    async def _connection(self, sock: socket.socket, addr: str, within_cap: bool) -> None:
        """Serve one accepted socket. ``within_cap``: it was among ``max_connections`` sockets
        when accepted (see ``_refusal``)."""
        # Error boundary: one bad client must never take the listener down.
        try:
            try:
                if not self.accepting:
                    return  # accepted just before the shutdown began
                self._waiting_heads.add(sock)
                request = await read_request(sock, trio.current_time() + self.config.handshake_timeout)
            except trio.TooSlowError:
                return  # too slow to send its head: dropped without an answer
            finally:
                self._waiting_heads.discard(sock)
            if request is None:  # answered (400, 431) or the peer left
                await _close_http(sock)
                return
            if request.path != "/ws":
                await self._http(sock, request)
                await _close_http(sock)
                return
            upgraded = await self._upgrade(sock, request, addr, within_cap)
            # The request head and the parser's state are done with: an idle session should not
            # carry them (~2 KB a connection) for its whole life.
            del request
            if upgraded is not None:
                session = self._session(*upgraded)
                del upgraded  # nor the tuple (~100 bytes a connection)
                await session
            else:
                await _close_http(sock)  # the refusal's answer, not lost to a reset
        except Exception:
            log.exception("event=connection_error peer=%s", addr)
        finally:
            sock.close()
            self.connections -= 1
            self.sockets_per_ip[addr] -= 1
            if not self.sockets_per_ip[addr]:
                del self.sockets_per_ip[addr]
            if self.connections == 0:
                self._all_closed.set()

    async def _http(self, sock: socket.socket, request: Request) -> None:
        if request.path == admin.PREFIX or request.path.startswith(admin.PREFIX + "/"):
            await admin.answer(
                sock,
                request,
                self.moderation,
                token=self.config.admin_token,
                body_timeout=self.config.handshake_timeout,
            )
            return
        await answer_http(sock, request, health=self.health, registry=self.registry, page=self.page)

    def health(self) -> dict[str, object]:
        return {
            "status": "ok",
            "redis": self.store.health(),
            "store": self.store.kind,
            "instance": self.store.instance,
            "bus": self._bus_state(),
            "connections": len(self.hub.clients),
            "keptSessions": len(self.resumes.kept),
            "rooms": len(self.hub.rooms),
            "uptimeSeconds": round(time.monotonic() - self.started, 1),
        }

    def _bus_state(self) -> str:
        """'ok' (cross-instance delivery through Redis), 'down' or 'disabled' (memory)."""
        bus = self.store.bus
        if bus is None:
            return "disabled"
        return "ok" if bus.usable else "down"

    # -- WebSocket sessions ------------------------------------------------------------------

    def _counters(self) -> dict[str, tuple[str, float]]:
        return {
            "aleatoria_deliveries": ("frames handed to client sockets", self.hub.deliveries),
            "aleatoria_broadcasts": ("room broadcasts", self.hub.broadcasts),
            **self.store.counters(),
        }

    def _gauges(self) -> dict[str, tuple[str, float]]:
        gauges = {
            "aleatoria_connections": ("open WebSocket sessions", len(self.hub.clients)),
            "aleatoria_tcp_connections": ("open TCP connections, handshakes included", self.connections),
            "aleatoria_rooms": ("rooms with members on this process", len(self.hub.rooms)),
            "aleatoria_redis_degraded": (
                "1 when Redis is configured but failing",
                1.0 if self.store.health() == "degraded" else 0.0,
            ),
            "aleatoria_bans_active": ("bans in force, shadow bans included", self.moderation.bans_active),
            "aleatoria_bus_up": (
                "1 while cross-instance delivery goes through Redis (scale-out)",
                1.0 if self._bus_state() == "ok" else 0.0,
            ),
        }
        gauges.update(self.store.gauges())
        return gauges

    def client_ip(self, request: Request, addr: str) -> str:
        header = self.config.client_ip_header
        if header:
            value = request.header(header.lower().encode("latin-1"))
            if value:
                # The last entry: the one the proxy itself added. A list header such as
                # X-Forwarded-For keeps what the client sent in front of it, so the first
                # entry is the client's to choose (and with it, its per-address cap).
                return value.rsplit(",", 1)[-1].strip()
        return addr

    def _refusal(self, request: Request, ip: str, within_cap: bool) -> tuple[int, str] | None:
        if not self.accepting:
            return 503, "Server is shutting down\n"
        config = self.config
        # Sockets count from accept (half-open ones too), in the order accepted: one that was
        # within the cap then is let in however many came after it (a burst of 20 at a cap of
        # 10 lets the first 10 in, not none); one over it, only once enough have gone since.
        if not within_cap and self.connections > config.max_connections:
            return 503, "Server is at its connection limit\n"
        if (
            config.max_connections_per_ip
            and config.client_ip_header
            and self.per_ip[ip] >= config.max_connections_per_ip
        ):
            return 503, "Too many connections from your address\n"
        user = request.param("userId")
        if user is None:
            return 400, "Missing userId\n"
        problem = id_problem(user, self.config.max_id_chars)
        if problem:
            return 400, f"Invalid userId: {problem}\n"
        if user == m.SYSTEM:
            return 400, "Invalid userId: 'system' is reserved for the server\n"
        room = request.param("room")
        if room is not None:
            problem = id_problem(room, self.config.max_id_chars)
            if problem:
                return 400, f"Invalid room: {problem}\n"
        level = request.param("v")
        if level not in (None, "1", "2"):
            return 400, "Invalid v: the protocol levels are 1 and 2\n"
        if request.param("resume") is not None and level != "2":
            return 400, "resume needs v=2\n"
        if not self.origins.allows(request.header(b"origin"), request.header(b"host")):
            return 403, "Origin not allowed\n"
        problem = handshake_problem(request)
        if problem:
            return 400, f"Bad WebSocket request: {problem}\n"
        if config.auth_secret:
            problem = token_problem(request.param("token"), user, config.auth_secret)
            if problem:
                return 401, f"Unauthorized: {problem}\n"
        return None

    async def _upgrade(
        self, sock: socket.socket, request: Request, addr: str, within_cap: bool
    ) -> tuple[WebSocket, str, str, str, float | None, Admission, str | None] | None:
        """Accept a WebSocket request: (the WebSocket, userId, room, client address, token
        expiry, admission, hello), or None after answering a refusal. ``hello``: None for a
        level-1 connection, else the resume token it presented ("" for none)."""
        ip = self.client_ip(request, addr)
        refusal = self._refusal(request, ip, within_cap)
        if refusal is not None:
            status, text = refusal
            self.stats.handshake_rejections[status] += 1
            log.info("event=handshake_rejected status=%d reason=%r", status, text.strip())
            await send_http(sock, status, text, method=request.method)
            return None
        user = request.param("userId") or ""
        # A ban keeps a user out on every instance (PROTOCOL.md section 13); the same read
        # brings who blocked it. Memory store: no suspension.
        admission = await self.store.safety.admit(user, time.time())
        if admission.refused:
            self.stats.handshake_rejections[403] += 1
            log.info("event=handshake_rejected status=403 reason='banned' user=%s", user)
            await send_http(sock, 403, "banned\n", method=request.method)
            return None
        config = self.config
        ws = accept_websocket(
            sock,
            request,
            max_message_bytes=config.max_frame_bytes,
            outbox_frames=config.outbox_frames,
            close_timeout=config.close_timeout,
            flusher=self.flusher,
            outbox_bytes=config.outbox_bytes,
            frame_rate=config.frame_rate,
            frame_burst=config.frame_burst,
        )
        expires = None
        if config.auth_secret:  # checked by _refusal: the token is valid
            expires = expires_at(token_expiry(request.param("token"), user, config.auth_secret))
        resume = request.param("resume")
        if request.param("v") != "2":
            hello = None
        elif resume == "":  # presented, and names nothing: answered ``resumed: false``
            hello = NO_SUCH_TOKEN
        else:
            hello = resume or ""
        return ws, user, request.param("room") or DEFAULT_ROOM, ip, expires, admission, hello

    async def _session(
        self,
        ws: WebSocket,
        user: str,
        room: str,
        ip: str,
        expires: float | None,
        admission: Admission,
        hello: str | None,
    ) -> None:
        session = self.new_session(ws, user, expires, admission)
        session.client.level2 = hello is not None
        self.per_ip[ip] += 1
        code: int | None = None
        try:
            await self.start_session(session, room, hello)
            # Only a store with round trips holds frames back to join them (``Session.flush``):
            # without one, no call after every read.
            on_idle = session.flush if self.store.round_trips else None
            code = await ws.serve(session.handle, self._tasks, on_idle)
        finally:
            with trio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
                if not self.keep_session(session, code, ip):
                    await self.end_session(session)
            self.per_ip[ip] -= 1
            if not self.per_ip[ip]:
                del self.per_ip[ip]
        assert code is not None  # serve returned
        self.stats.disconnects[code if code < _APPLICATION_CODES or code in _OUR_CODES else "other"] += 1
        log.info("event=disconnected user=%s code=%s", user, code)

    def new_session(
        self, ws: WebSocket, user: str, expires: float | None = None, admission: Admission | None = None
    ) -> Session:
        """A session for ``user`` on ``ws`` (a connection, or a test's recording socket).
        ``admission``: what the store said at the handshake (blocks, shadow ban)."""
        config = self.config
        client = Client(
            user=user,
            ws=ws,
            limiter=RateLimiter(config.rate_limit, config.rate_burst, config.rate_abuse_seconds),
            connection=new_message_id(),
            expires_at=expires,
        )
        if admission is not None:
            if admission.blocked_by:
                client.blocked_by = set(admission.blocked_by)
            client.shadow = admission.shadow
        self.stats.connections_opened += 1
        return Session(client, self.router, self.store, config, self.moderation)

    async def start_session(self, session: Session, room: str, hello: str | None = None) -> None:
        """Attach ``session`` (replacing the user's previous connection, here or on another
        instance), register it, and join ``room``. ``hello``: for a level-2 session (its
        client's ``level2``), the resume token it presented, "" for none: a session resumed
        joins nothing. Cancellation: call ``end_session``."""
        client, user = session.client, session.user
        # One user's connections set up and tear down one at a time on this instance, so the
        # order in which the hub replaces them is the order in which the store registers
        # them: the last one to connect is the one presence names, and the one every other
        # instance evicts toward (PROTOCOL.md section 16).
        async with self._user_turn(user):
            outcome = await self._resume(session, hello) if hello else None
            if outcome == "ok":
                return
            stale = self.resumes.kept.get(user)
            if stale is not None:
                # Not resumed (PROTOCOL.md section 15): the kept session's leave happens now,
                # then this one starts afresh.
                self.resumes.end(stale)
                await self._forget(stale.client)
            # A level-2 session hears its welcome first: what comes for it meanwhile (and, for a
            # session another instance may be keeping, until that instance answers) waits.
            own_ws, holding = client.ws, None
            if client.level2:
                holding = self.remote.holding()
                client.ws = cast(WebSocket, holding)
            remote = outcome == UNKNOWN and self.store.bus is not None
            if outcome is not None and not remote:
                self._resume_failed(user, outcome)
            replaced = self.hub.attach(client)
            # Presence: registered before the first room join, so this user is reachable
            # from every instance by the time it hears ``room_joined``.
            takeover = await self.store.connect(user, client.connection)
            log.info(
                "event=connected user=%s room=%s replaced=%s",
                user,
                room,
                "here" if replaced is not None else (takeover.instance if takeover else "no"),
            )
            if takeover is not None:
                if not remote:
                    self.router.evict(takeover.instance, user, takeover.connection)
                await session.adopt_rooms(takeover.rooms)
            if outcome is not None and not remote and (takeover is not None or replaced is not None):
                # A token refused here (used, expired, wrong) while the user's session lives,
                # on another instance or on this one: that session leaves (PROTOCOL.md section
                # 15), as when its owner refuses the token, rather than carrying over to a
                # "fresh" one (its rooms, pool place or match).
                await self._leave_adopted(session)
            if remote and holding is not None:
                status, owner_frames = UNKNOWN, b""
                if takeover is not None:  # rooms subscribed: ask the owner now (it evicts)
                    status, owner_frames = await self.remote.ask(
                        takeover.instance, user, takeover.connection, hello or ""
                    )
                counts = None
                if status == "ok":
                    # Read before the check below: an eviction arriving during this read (the
                    # user's next registration, e.g. the same token resumed on a third
                    # instance) must end this resume, or it went on as resumed on a socket
                    # nothing would close (PROTOCOL.md section 16).
                    counts = await self.store.stats()
                if status == "ok" and holding.close_code is not None:
                    status = OVERFLOW  # ended meanwhile: too many frames came, or a successor
                if status == "ok":
                    assert takeover is not None  # only an owner answers "ok"
                    assert counts is not None
                    self.hub.swap_socket(client, own_ws)
                    frames = RemoteResumes.merge(owner_frames, holding)
                    self._send_welcome(session, counts.online, counts.searching, True, len(frames))
                    for frame in frames:
                        own_ws.send(frame)
                    log.info(
                        "event=resumed user=%s missed=%d from_instance=%s",
                        user,
                        len(frames),
                        takeover.instance,
                    )
                    return
                self._resume_failed(user, status)
                if takeover is not None or replaced is not None:
                    await self._leave_adopted(session)
                holding.frames.clear()  # they were the old session's: this one is fresh
            if holding is not None:
                counts = await self.store.stats()
                self.hub.swap_socket(client, own_ws)
                self._send_welcome(session, counts.online, counts.searching, False if hello else None, None)
                # What ended the session while it waited ends its socket the same way: a
                # successor on any instance (4001), a ban, a shutdown, or too many frames (1013).
                if holding.close_code == ABNORMAL:
                    own_ws.abort()
                elif holding.close_code is not None:
                    own_ws.close(holding.close_code, holding.close_reason)
                for data, count in holding.frames:
                    own_ws.send(data, count)
            await session.join(room)

    def _send_welcome(
        self, session: Session, online: int, searching: int, resumed: bool | None, missed: int | None
    ) -> None:
        ice, servers, policy = self.config.ice, None, None
        if ice.configured:
            servers, policy = ice_servers(ice, session.user, int(time.time())), ice.transport_policy
        welcome = m.Welcome(
            session_id=session.client.connection,
            resume_token=self.resumes.issue(session.client),
            resume_window=self.config.resume_window,
            online=m.Online(users=online, searching=searching),
            ice_servers=servers,
            ice_transport_policy=policy,
            resumed=resumed,
            missed=missed,
        )
        session.reply(m.WELCOME, welcome)

    async def _resume(self, session: Session, token: str) -> str:
        """Resume the session ``token`` names, if it is here (PROTOCOL.md section 15): the
        user's kept session, or its live one whose drop was not noticed yet. Called in the
        user's turn. Returns "ok" (resumed), or why not: ``UNKNOWN`` may be another
        instance's session (resume_remote.py); anything else is a fresh session."""
        client, user, resumes = session.client, session.user, self.resumes
        counts = await self.store.stats()  # before: nothing may come between the steps below
        reason = resumes.check(user, token)
        kept: KeptSession | None = None
        old = self.hub.clients.get(user)
        if reason is None:
            kept = resumes.take(user, token)
            if kept is not None:
                old = kept.client
            elif old is None or resumes.live_token(old) != token:
                reason = resumes.reason_for(user)
            else:
                resumes.take_live(old)
        if reason is not None:
            return reason
        assert old is not None
        # The session keeps its connection id: presence, pool place and match stay as they are.
        client.connection = old.connection
        self.hub.attach(client)  # its rooms move here; the kept outbox (or old socket) closes
        frames = kept.outbox.frames if kept is not None else []
        self._send_welcome(session, counts.online, counts.searching, True, sum(n for _, n in frames))
        for data, count in frames:
            client.ws.send(data, count)
        log.info("event=resumed user=%s missed=%d kept=%s", user, len(frames), kept is not None)
        return "ok"

    def _resume_failed(self, user: str, reason: str) -> None:
        self.resumes.failed(reason)
        log.info("event=resume_failed user=%s reason=%s", user, reason)

    async def _leave_adopted(self, session: Session) -> None:
        """A resume failed while the user's session lived on another instance (its owner
        refused the token, or this instance did): what the session adopted from there
        (rooms, pool place, match) is left now, as that session's leave; then the session
        registers afresh, under a new connection id: a connection of the user that registered
        meanwhile (on another instance) evicted the old id, which now names nothing, and the
        new registration evicts that connection in turn, as any later connect does. Without
        it the registration took the user back from that connection while both were closed
        as replaced, and the presence it left named a closed connection for good."""
        client, user = session.client, session.user
        rooms = sorted(client.rooms)
        for room in rooms:
            self.hub.leave(client, room)
            self.router.presence.member(m.MEMBER_LEFT, room, user)
        peer = await self.store.user_gone(user, client.connection, rooms)
        if peer is not None:
            self.router.peer_left(peer, user)
        if client.replaced:
            return  # evicted meanwhile: its successor owns the user
        client.connection = new_message_id()
        takeover = await self.store.connect(user, client.connection)
        if takeover is not None:
            self.router.evict(takeover.instance, user, takeover.connection)
            await session.adopt_rooms(takeover.rooms)

    def keep_session(self, session: Session, code: int | None, ip: str = "") -> bool:
        """Keep ``session`` for a resume if its connection (from ``ip``) dropped (PROTOCOL.md
        section 15); False: end it (``end_session``). Synchronous: no frame is lost in between."""
        client = session.client
        if (
            code not in KEEP_CODES
            or not client.level2
            or not self.accepting
            or self.config.resume_window <= 0
            or client.replaced
            or self.hub.clients.get(client.user) is not client
        ):
            return False
        if not self._may_keep(ip):
            self.resumes.not_kept += 1
            log.info("event=session_not_kept user=%s reason=kept_sessions_cap", client.user)
            return False
        kept = self.resumes.keep(client)
        if kept is None:
            return False
        self.hub.swap_socket(client, cast(WebSocket, kept.outbox))  # duck-typed: the verbs used
        self.kept_per_ip[ip] += 1
        self._tasks.start_soon(self._expire, kept, ip)
        log.info("event=session_kept user=%s code=%s window=%s", client.user, code, self.config.resume_window)
        return True

    def _may_keep(self, ip: str) -> bool:
        """Whether one more session may be kept: a kept session holds a connection's state
        without its socket, so kept sessions are capped as sockets are, per IP
        (``max_connections_per_ip``) and in all (``max_connections``). Without it one
        address dropping connection after connection held 17,500 sessions in 10 s."""
        config = self.config
        if len(self.resumes.kept) >= config.max_connections:
            return False
        per_ip = config.max_connections_per_ip
        return not per_ip or self.kept_per_ip[ip] < per_ip

    async def _expire(self, kept: KeptSession, ip: str) -> None:
        """Wait out ``kept``'s window (or until it ends early); unless resumed meanwhile, the
        leave then happens as for any disconnect. Cancellation (shutdown): it just ends."""
        try:
            with kept.scope:
                await trio.sleep_forever()
            if kept.over:
                return
            with trio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
                async with self._user_turn(kept.client.user):
                    if kept.over:
                        return
                    self.resumes.end(kept)
                    log.info("event=session_ended user=%s reason=%s", kept.client.user, kept.reason)
                    await self._forget(kept.client)
        finally:
            self.kept_per_ip[ip] -= 1
            if not self.kept_per_ip[ip]:
                del self.kept_per_ip[ip]

    async def end_session(self, session: Session) -> None:
        """The connection of ``session`` is over: unless a successor took the user over,
        leave its rooms, pool place and match (its peer is told)."""
        self.resumes.discard(session.client)
        async with self._user_turn(session.user):
            await self._forget(session.client)

    def _user_turn(self, user: str) -> _Turn:
        """``user``'s turn (``async with``): connection set-up and clean-up of one user never
        interleave on this instance. It exists while anyone holds or awaits it."""
        turn = self._turns.get(user)
        if turn is None:
            turn = self._turns[user] = _Turn(user, self._turns)
        return turn

    async def _forget(self, client: Client) -> None:
        if client.replaced:
            return  # the successor owns the user's rooms, pool place and match
        rooms = self.hub.detach(client)
        for room in rooms:
            self.router.presence.member(m.MEMBER_LEFT, room, client.user)
        peer = await self.store.user_gone(client.user, client.connection, rooms)
        if peer is not None:
            self.router.peer_left(peer, client.user)

    # -- shutdown ------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        self.accepting = False
        self.accept_scope.cancel()

    async def close_connections(self) -> None:
        """Stop taking sessions, close every WebSocket with 1001 and wait for them to end."""
        self.accepting = False
        self.hub.close_all(GOING_AWAY, "server shutting down")
        for sock in self._waiting_heads:  # their reads end (EOF): nothing was asked yet
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        if self.connections:
            self._all_closed = trio.Event()
            await self._all_closed.wait()
        self.resumes.end_all()  # kept sessions leave now
        await self.resumes.all_ended.wait()


async def serve(
    config: Config,
    *,
    reuse_port: bool = False,
    worker: int | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until cancelled. Reports the bound port through ``task_status``.
    ``worker``: this is worker number ``worker`` of ``--workers`` (its parent logs the
    ``listening on`` line; the worker logs ``event=worker_listening``).

    On cancellation (a signal in the CLI, or the caller's scope) the server shuts down
    gracefully within ``config.shutdown_timeout`` — closing sockets with 1001 and flushing
    the store — and then lets the cancellation propagate. Raises OSError if it cannot bind.
    """
    listener = open_listener(config.host, config.port, reuse_port=reuse_port)
    port = listener.getsockname()[1]
    _raise_fd_limit(config)
    if config.allowed_hosts is None and config.host in ("0.0.0.0", "::", "") and worker in (None, 0):
        log.warning(
            "event=allowed_hosts_default hosts=%s: pages served under another name (a proxy's "
            "public host, a LAN address) are refused as same-origin; list them in "
            "ALEATORIA_ALLOWED_HOSTS or their origins in ALEATORIA_ALLOWED_ORIGINS",
            ",".join(config.effective_allowed_hosts),
        )
    if config.ice.configured and worker in (None, 0):
        log.info(
            "event=ice_servers urls=%s turn_secrets=%d turn_ttl=%d relay_only=%s",
            ",".join(config.ice_urls),
            len(config.turn_secret),
            config.turn_ttl,
            "on" if config.relay_only else "off",
        )
    with listener:
        await _serve_with(config, listener, worker, port, task_status)


async def serve_unlistened(
    config: Config, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
) -> None:
    """The whole server without a listener, for the in-memory test tier: the store, hub,
    flusher, supervisor, moderation and search tasks of ``serve``; reports the ``Server``,
    whose ``serve_connection`` serves each connected socket a test hands it (one end of a
    ``socket.socketpair()``: no port, no bind, no TCP). Cancellation shuts down gracefully,
    as ``serve`` does."""
    await _serve_with(config, None, None, 0, task_status)


async def _serve_with(
    config: Config,
    listener: socket.socket | None,
    worker: int | None,
    port: int,
    task_status: trio.TaskStatus[int] | trio.TaskStatus[Server],
) -> None:
    """``serve``'s body, accepting from ``listener`` (None: connections come through
    ``Server.serve_connection``); reports ``port``, or the ``Server`` without a listener."""
    async with (
        open_store(config) as store,
        open_hub(config.room_linger, store.bus) as hub,
        open_flusher() as flusher,
    ):
        hub.max_rooms = config.max_rooms
        server = Server(config, store, hub, flusher)
        # The server's own tasks run under a shield, so that cancelling ``serve`` does
        # not kill connections mid-frame: the ``finally`` below closes them in order.
        body = trio.CancelScope(shield=True)
        async with trio.open_nursery() as nursery:
            # First: an OSError here must leave no shielded task behind (metrics_port).
            view = await nursery.start(serve_operator_view, server, worker)
            await nursery.start(_run_body, server, listener, body)
            if listener is None:
                cast("trio.TaskStatus[Server]", task_status).started(server)
            else:
                _log_listening(config, store, worker, port, view)
                cast("trio.TaskStatus[int]", task_status).started(port)
            try:
                await trio.sleep_forever()
            finally:
                with trio.move_on_after(config.shutdown_timeout - 1.0, shield=True):
                    log.info("event=shutdown_started connections=%d", len(hub.clients))
                    server.stop_accepting()
                    await server.close_connections()
                body.cancel()
                log.info("event=shutdown_done")


def _log_listening(config: Config, store: Store, worker: int | None, port: int, view: str | None) -> None:
    where = f"{_display_host(config.host)}:{port}"
    if worker is None:
        log.info(
            "listening on ws://%s/ws store=%s instance=%s health=http://%s/health",
            where,
            store.kind,
            store.instance,
            view or where,
        )
    else:
        log.info(  # the line's worker= is the logger's (logs.configure)
            "event=worker_listening address=%s store=%s instance=%s",
            where,
            store.kind,
            store.instance,
        )


async def serve_operator_view(
    server: Server, worker: int | None, *, task_status: trio.TaskStatus[str | None] = trio.TASK_STATUS_IGNORED
) -> None:
    """With ``metrics_port`` set: /health and /metrics of this process on that port, or, in a
    ``--workers`` worker, on its private socket for the parent (overview.py). Reports the
    operator address (``host:port``, None for none or a worker's). Raises OSError if the
    port cannot be bound."""
    config = server.config
    if config.metrics_port is None:
        task_status.started(None)
        return
    address: str | tuple[str, int]
    if worker is None:
        address = (config.host, config.metrics_port)
    else:
        address = overview.worker_view_name(os.getppid(), worker)
    try:
        listener = overview.open_view_listener(address)
    except OSError as exc:
        raise OSError(exc.errno, f"metrics port {config.metrics_port}: {exc.strerror}") from None
    with listener:
        shown = None if worker is not None else f"{_display_host(config.host)}:{listener.getsockname()[1]}"
        task_status.started(shown)
        await overview.answer_forever(listener, overview.local_answer(server.health, server.registry))


async def _run_body(
    server: Server,
    listener: socket.socket | None,
    body: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with body:
        async with trio.open_nursery() as nursery:
            server._tasks = nursery  # connections, and their writer tasks when they need one
            nursery.start_soon(supervise, server.hub, server.config)
            nursery.start_soon(server.moderation.count_bans_forever)
            nursery.start_soon(
                search_forever,
                server.store,
                server.router,
                server.config.ice,
                server.stats,
                server.config.announce_retry,
            )
            webhook = server.moderation.webhook
            if webhook is not None:
                nursery.start_soon(webhook.run)
            task_status.started()
            if listener is not None:
                with server.accept_scope:
                    await server.accept_forever(listener, nursery)
            # Not accepting any more; connections finish under the shutdown deadline.
            await trio.sleep_forever()


class _Turn:
    """One user's turn: a first-come first-served lock that costs no scheduler round trip and
    no lock object when nobody else holds it (every connection takes it twice; trio's
    ``Lock`` always checkpoints, and making one cost ~3 us a connection)."""

    __slots__ = ("_held", "_table", "_user", "_users", "_waiting")

    def __init__(self, user: str, table: dict[str, _Turn]) -> None:
        self._held = False
        self._table = table
        self._user = user
        self._users = 0
        self._waiting: deque[trio.Event] | None = None

    async def __aenter__(self) -> None:
        self._users += 1
        if not self._held:
            self._held = True
            return
        if self._waiting is None:
            self._waiting = deque()
        handed = trio.Event()
        self._waiting.append(handed)
        try:
            await handed.wait()  # the holder hands the turn over: it stays held
        except BaseException:
            if handed.is_set():
                self._pass_on()  # handed over as this task was cancelled: the next one has it
            else:
                self._waiting.remove(handed)
            self._leave()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._pass_on()
        self._leave()

    def _pass_on(self) -> None:
        if self._waiting:
            self._waiting.popleft().set()
        else:
            self._held = False

    def _leave(self) -> None:
        self._users -= 1
        if not self._users:
            del self._table[self._user]


class _Forward(Collector):
    """Exposes another registry's metrics (those of the Redis adapter) in this one."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self._registry.collect()


def fds_needed(config: Config) -> int:
    """Open files the server may need at once: ``max_connections``, the sockets accepted
    beyond it to answer /health and 503 while full, and the spare descriptors."""
    return config.max_connections + _HTTP_RESERVE + _SPARE_FDS


def _raise_fd_limit(config: Config) -> None:
    """Raise the soft limit on open files to the hard limit: each connection is a file, and
    at the common default of 1,024 a few idle sockets would starve accept (and /health).
    Warn when even that is below ``fds_needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    needed = fds_needed(config)
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "event=fd_limit_low limit=%d needed=%d max_connections=%d: the open-files limit must "
            "cover max_connections plus %d spare descriptors; raise it to %d (ulimit -n, systemd "
            "LimitNOFILE) or lower ALEATORIA_MAX_CONNECTIONS to %d",
            soft,
            needed,
            config.max_connections,
            needed - config.max_connections,
            needed,
            max(1, soft - (needed - config.max_connections)),
        )


_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 39\r\nconnection: close\r\n\r\nToo many connections from your address\n"
)


_LINGER_SECONDS = 1.0
_LINGER_BYTES = 256 * 1024


async def _close_http(sock: socket.socket) -> None:
    """End a plain HTTP exchange without resetting it: closing a socket that still has unread
    input makes the kernel send a reset, which can destroy the answer in flight (a refused
    request whose body the client is still sending: 413, 431). So shut our side, then read
    and drop what comes until the client closes, bounded in time and bytes. Most clients
    close at once after the answer."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    drained = 0
    with trio.move_on_after(_LINGER_SECONDS):
        while drained < _LINGER_BYTES:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError:
                return
            if not data:
                return
            drained += len(data)


def _refuse_now(sock: socket.socket) -> None:
    """Answer 503 without reading or waiting (best effort: the kernel takes it or not) and
    close: a socket over the caps must cost no task and no time."""
    try:
        sock.setblocking(False)
        sock.send(_BUSY)
    except OSError:
        pass
    finally:
        sock.close()


def _display_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
