#!/usr/bin/env python3
"""CPU per request inside the session, without sockets: the real store, hub, router and
sessions with a socket that only counts, 20,000 DMs and 20,000 pings through
``Session.handle``. For before/after comparisons of the protocol core's cost (run it with
each version's interpreter, alternating, several times: the machine is noisy).

    python scripts/session_cost.py
"""

from __future__ import annotations

import json
import time

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


async def main() -> None:
    config = Config(port=0, rate_limit=0)
    async with (
        open_store(config) as store,
        open_hub(config.room_linger, store.bus) as hub,
        open_flusher() as flusher,
    ):
        server = Server(config, store, hub, flusher)
        sessions = {}
        for user in ("alice", "bob"):
            session = server.new_session(CountingSocket(), user)  # type: ignore[arg-type]
            await server.start_session(session, "Lobby")
            sessions[user] = session
        dm = json.dumps({"type": "chat_message", "toUser": "bob", "payload": {"content": "hello there"}})
        for label, frame in (("dm", dm.encode()), ("ping", b'{"type":"ping"}')):
            started = time.perf_counter()
            for _ in range(COUNT):
                await sessions["alice"].handle(frame)
            print(f"{label}: {(time.perf_counter() - started) / COUNT * 1e6:.1f} us per request")


if __name__ == "__main__":
    trio.run(main)
