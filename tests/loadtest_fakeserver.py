"""A small fake Aleatoria server for the load-test tool's tests, with injectable faults.

It speaks just enough of PROTOCOL.md for the load test (rooms, room and direct chat,
matching with live matches, signaling relay, ping) on trio-websocket, and can break
the guarantees on purpose so the tests can check that the tool notices:
``drop_every``/``duplicate_every`` (every Nth chat delivery to a connection),
``swap`` (chat deliveries to a connection leave in swapped pairs), ``double_match``
(matching ignores live matches) and ``rate_limit_every`` (every Nth chat a client
sends is refused with ``rate_limited``).

The search queue (PROTOCOL.md section 12, ``wait: true``) is a simple one: a newcomer goes
to the oldest waiting searcher it is compatible with (the same language when both gave one,
never met before: the fake's cooldown is forever; interests are not waited for, as if
``ALEATORIA_INTEREST_WAIT`` were 0). Its faults: ``unfair`` (a stack: once three wait, the
newest compatible searcher gets the newcomer, so the oldest waits for ever), ``rematch``
(former partners meet again) and ``double_match`` (anyone connected is picked, in a match or
not).
"""

from __future__ import annotations

import contextlib
import itertools
import random
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket


@attrs.frozen
class Faults:
    drop_every: int = 0
    duplicate_every: int = 0
    swap: bool = False
    double_match: bool = False
    rate_limit_every: int = 0
    unfair: bool = False
    rematch: bool = False


@attrs.define(eq=False)
class Conn:
    user: str
    send: trio.MemorySendChannel[tuple[bool, str]]
    chats_in: int = 0


class FakeServer:
    def __init__(self, faults: Faults = Faults()) -> None:
        self.faults = faults
        self.conns: dict[str, Conn] = {}
        self.rooms: dict[str, set[str]] = {}
        self.pool: set[str] = set()
        self.matches: dict[str, str] = {}
        self.roles: dict[str, str] = {}
        self.queue: dict[str, tuple[list[str], str | None]] = {}  # searcher -> profile, oldest first
        self.met: set[frozenset[str]] = set()
        self.ids = itertools.count()
        self.port = 0
        self.chats_seen = 0
        self._chat_waiters: list[tuple[int, trio.Event]] = []

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on a free loopback port; report it with ``task_status.started(port)``."""
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, self.handler, "127.0.0.1", 0, None)
            self.port = server.port
            task_status.started(self.port)

    async def wait_chats(self, count: int) -> None:
        """Return once clients have sent ``count`` chat messages (a test's sync point)."""
        if self.chats_seen < count:
            event = trio.Event()
            self._chat_waiters.append((count, event))
            await event.wait()

    # -- envelope helpers -----------------------------------------------------------

    def _stamp(self, message: dict[str, Any]) -> dict[str, Any]:
        message.setdefault("messageId", f"m{next(self.ids)}")
        message["createTime"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        return message

    def deliver(self, user: str, message: dict[str, Any]) -> None:
        conn = self.conns.get(user)
        if conn is None:
            return
        frame = (message.get("type") == "chat_message", orjson.dumps(message).decode())
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            conn.send.send_nowait(frame)

    def system(self, user: str, kind: str, payload: dict[str, Any], **extra: Any) -> None:
        self.deliver(
            user,
            self._stamp({"type": kind, "fromUser": "system", "toUser": user, "payload": payload, **extra}),
        )

    def error(self, user: str, code: str) -> None:
        self.system(user, "error", {"error": code, "code": code})

    # -- connection ---------------------------------------------------------------------

    async def handler(self, request: WebSocketRequest) -> None:
        parts = urlsplit(request.path)
        query = parse_qs(parts.query)
        if parts.path != "/ws":
            await request.reject(404, body=b"not found")
            return
        if not query.get("userId"):
            await request.reject(400, body=b"userId required")
            return
        user = query["userId"][0]
        room = query.get("room", ["Lobby"])[0]
        ws = await request.accept()
        send, receive = trio.open_memory_channel[tuple[bool, str]](10_000)
        conn = Conn(user, send)
        self.conns[user] = conn
        self.rooms.setdefault(room, set()).add(user)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, ws, receive)
                try:
                    while True:
                        self.handle(conn, orjson.loads(await ws.get_message()))
                except ConnectionClosed:
                    pass
                nursery.cancel_scope.cancel()
        finally:
            self._forget(conn)

    def _forget(self, conn: Conn) -> None:
        if self.conns.get(conn.user) is not conn:
            return
        del self.conns[conn.user]
        self.pool.discard(conn.user)
        self.queue.pop(conn.user, None)
        for members in self.rooms.values():
            members.discard(conn.user)
        peer = self.matches.pop(conn.user, None)
        if peer is not None and self.matches.get(peer) == conn.user:
            del self.matches[peer]
            self.deliver(
                peer,
                self._stamp(
                    {
                        "type": "hangup",
                        "fromUser": conn.user,
                        "toUser": peer,
                        "payload": {"reason": "peer_left"},
                    }
                ),
            )

    async def _writer(self, ws: Any, receive: trio.MemoryReceiveChannel[tuple[bool, str]]) -> None:
        faults = self.faults
        chats = 0
        try:
            async for is_chat, text in receive:
                if not is_chat:
                    await ws.send_message(text)
                    continue
                chats += 1
                if faults.drop_every and chats % faults.drop_every == 0:
                    continue
                if faults.swap:
                    # Hold this one back until the next chat has gone out (or 20 ms passed).
                    following = None
                    with trio.move_on_after(0.02):
                        following = await receive.receive()
                    if following is not None:
                        await ws.send_message(following[1])
                await ws.send_message(text)
                if faults.duplicate_every and chats % faults.duplicate_every == 0:
                    await ws.send_message(text)
        except ConnectionClosed:
            pass

    # -- protocol ---------------------------------------------------------------------

    def handle(self, conn: Conn, message: dict[str, Any]) -> None:
        user = conn.user
        kind = message.get("type")
        raw = message.get("payload")
        payload: dict[str, Any] = raw if isinstance(raw, dict) else {}
        if kind == "chat_message":
            conn.chats_in += 1
            self.chats_seen += 1
            for threshold, event in self._chat_waiters:
                if self.chats_seen >= threshold:
                    event.set()
            every = self.faults.rate_limit_every
            if every and conn.chats_in % every == 0:
                self.error(user, "rate_limited")
                return
            out = self._stamp({"type": "chat_message", "fromUser": user, "payload": payload})
            if message.get("room"):
                room = message["room"]
                if user not in self.rooms.get(room, set()):
                    self.error(user, "not_in_room")
                    return
                out["room"] = room
                for member in sorted(self.rooms[room]):
                    self.deliver(member, out)
            else:
                recipient = str(message.get("toUser"))
                self.deliver(recipient, {**out, "toUser": recipient, "incoming": True})
                self.deliver(user, {**out, "toUser": recipient, "incoming": False})
        elif kind == "join_room":
            self.rooms.setdefault(message["room"], set()).add(user)
            self.system(
                user, "room_joined", {"room": message["room"], "action": "joined"}, room=message["room"]
            )
        elif kind == "ping":
            self.system(user, "pong", {})
        elif kind == "user_available_webrtc":
            self.pool.add(user)
        elif kind == "user_unavailable_webrtc":
            self.pool.discard(user)
        elif kind == "request_random_peer" and payload.get("wait") is True:
            self._search(user, payload)
        elif kind == "cancel_search":
            self.queue.pop(user, None)
        elif kind == "request_random_peer":
            self._request(user)
        elif kind in {"webrtc_offer", "webrtc_answer", "webrtc_candidate", "hangup"}:
            target = message.get("toUser")
            if target not in self.conns:
                self.error(user, "peer_unavailable")
                return
            if kind == "hangup" and self.matches.get(user) == target:
                del self.matches[user]
                if self.matches.get(target) == user:
                    del self.matches[target]
            self.deliver(
                target, self._stamp({"type": kind, "fromUser": user, "toUser": target, "payload": payload})
            )
        else:
            self.error(user, "unknown_type")

    def _request(self, user: str) -> None:
        if user in self.matches and not self.faults.double_match:
            # The protocol: no second match, re-send the current assign_role.
            self.system(user, "assign_role", {"role": self._role(user), "peerId": self.matches[user]})
            return
        if self.faults.double_match:
            candidates = [u for u in self.conns if u != user]
        else:
            candidates = [u for u in self.pool if u != user and u in self.conns and u not in self.matches]
        if not candidates:
            self.system(
                user,
                "no_peer_available",
                {"message": "No peer available at the moment. Please try again later."},
            )
            return
        peer = random.choice(sorted(candidates))
        self.pool.discard(user)
        self.pool.discard(peer)
        self.matches[user] = peer
        self.matches[peer] = user
        self.roles[user] = "impolite"
        self.roles[peer] = "polite"
        self.system(user, "assign_role", {"role": "impolite", "peerId": peer})
        self.system(peer, "assign_role", {"role": "polite", "peerId": user})

    def _search(self, user: str, payload: dict[str, Any]) -> None:
        peer = self.matches.get(user)
        if peer is not None and not self.faults.double_match:
            if payload.get("currentPeerId") != peer:
                self.system(user, "assign_role", {"role": self._role(user), "peerId": peer})
                return
            del self.matches[user]  # "Next": the match ends, the peer is told
            if self.matches.get(peer) == user:
                del self.matches[peer]
            self.deliver(
                peer,
                self._stamp(
                    {"type": "hangup", "fromUser": user, "toUser": peer, "payload": {"reason": "peer_left"}}
                ),
            )
        self.queue.pop(user, None)
        interests = [str(tag).strip().casefold() for tag in payload.get("interests") or []]
        language = payload.get("language")
        self.queue[user] = (interests, language)
        reply: dict[str, Any] = {
            "interests": interests,
            "position": len(self.queue),
            "online": len(self.conns),
        }
        if language is not None:
            reply["language"] = language
        self.system(user, "searching", reply)
        if self.faults.double_match:
            others = sorted(u for u in self.conns if u != user)
            if others:
                self._pair_searchers(random.choice(others), user)
            return
        older = [u for u in self.queue if u != user and self._compatible(u, user)]
        # ``older`` keeps the queue's order: all of them joined before ``user``.
        if self.faults.unfair:
            if len(self.queue) >= 3 and older:  # a stack that keeps one searcher in reserve
                self._pair_searchers(older[-1], user)
        elif older:
            self._pair_searchers(older[0], user)

    def _compatible(self, a: str, b: str) -> bool:
        la, lb = self.queue[a][1], self.queue[b][1]
        if la is not None and lb is not None and la != lb:
            return False
        return self.faults.rematch or frozenset((a, b)) not in self.met

    def _pair_searchers(self, served: str, partner: str) -> None:
        theirs = set(self.queue.get(partner, ([], None))[0])
        common = [tag for tag in self.queue.get(served, ([], None))[0] if tag in theirs]
        self.queue.pop(served, None)
        self.queue.pop(partner, None)
        self.matches[served] = partner
        self.matches[partner] = served
        self.roles[served] = "impolite"
        self.roles[partner] = "polite"
        self.met.add(frozenset((served, partner)))
        match_id = f"fm{next(self.ids)}"
        for user, role, peer in ((served, "impolite", partner), (partner, "polite", served)):
            self.system(
                user,
                "assign_role",
                {"role": role, "peerId": peer, "matchId": match_id, "commonInterests": common},
            )

    def _role(self, user: str) -> str:
        return self.roles.get(user, "impolite")
