#!/usr/bin/env python3
"""CPU per request inside the session, without sockets: the real store, hub, router and
sessions with a socket that only counts, 20,000 DMs, 20,000 room messages (the session's part: the room's
broadcaster is not run), 20,000 pings and 20,000 ICE candidates to a match peer through
``Session.handle``. For before/after comparisons of the protocol core's cost (run it with
each version's interpreter, alternating, several times: the machine is noisy).

    python scripts/session_cost.py
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import trio

from aleatoria.config import Config
from aleatoria.flusher import open_flusher
from aleatoria.hub import open_hub
from aleatoria.server import Server
from aleatoria.store import open_store

COUNT = 20_000


class CountingSocket:
    """Stands in for the WebSocket: counts what it is sent."""

    closing = False

    def __init__(self) -> None:
        self.sent = 0
        self.close_code: int | None = None
        self.last_seen = 0.0

    def send(self, data: bytes, frames: int = 1) -> None:
        self.sent += frames

    send_now = send

    def flush(self) -> None:
        pass

    def close(self, code: int, reason: str = "") -> None:
        self.close_code = code


async def _session(server: Any, user: str) -> Any:
    """A started session of ``user``, on this version's server or on one from before the
    session set-up was a method (146b0cd and older: for side-by-side runs)."""
    if hasattr(server, "new_session"):
        session = server.new_session(CountingSocket(), user)
        await server.start_session(session, "Lobby")
        return session
    from aleatoria.hub import Client
    from aleatoria.limits import RateLimiter
    from aleatoria.session import Session

    config = server.config
    limiter = RateLimiter(config.rate_limit, config.rate_burst, config.rate_abuse_seconds)
    client = Client(user=user, ws=CountingSocket(), limiter=limiter, connection=user)
    server.hub.attach(client)
    session = Session(client, server.router, server.store, config)
    await server.store.connect(user, client.connection)
    await session.join("Lobby")
    return session


def _hub(config: Config, store: Any) -> Any:
    try:
        return open_hub(config.room_linger, store.bus)
    except TypeError:  # before the hub took the bus (146b0cd and older)
        return open_hub(config.room_linger)  # type: ignore[call-arg]


async def main() -> None:
    config = Config(port=0, rate_limit=0)
    async with (
        open_store(config) as store,
        _hub(config, store) as hub,
        open_flusher() as flusher,
    ):
        server = Server(config, store, hub, flusher)
        sessions = {user: await _session(server, user) for user in ("alice", "bob")}
        dm = json.dumps({"type": "chat_message", "toUser": "bob", "payload": {"content": "hello there"}})
        room = json.dumps({"type": "chat_message", "room": "Lobby", "payload": {"content": "hello there"}})
        # A call's signal: bob pooled, alice asks for a peer and gets him.
        await sessions["bob"].handle(b'{"type":"user_available_webrtc"}')
        await sessions["alice"].handle(b'{"type":"request_random_peer","payload":{}}')
        candidate = json.dumps(
            {
                "type": "webrtc_candidate",
                "toUser": "bob",
                "payload": {
                    "candidate": {"candidate": "candidate:0 1 udp 2122260223 192.0.2.1 54000 typ host"}
                },
            }
        )
        frames = (
            ("dm", dm.encode()),
            ("room", room.encode()),
            ("ping", b'{"type":"ping"}'),
            ("candidate", candidate.encode()),
        )
        for label, frame in frames:
            started = time.perf_counter()
            for _ in range(COUNT):
                await sessions["alice"].handle(frame)
            print(f"{label}: {(time.perf_counter() - started) / COUNT * 1e6:.1f} us per request")


if __name__ == "__main__":
    argparse.ArgumentParser(
        description="CPU per DM, room message, ping and call signal inside Session.handle, without sockets."
    ).parse_args()
    trio.run(main)
