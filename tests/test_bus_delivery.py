"""What the Redis bus hands over in one go reaches the local members as the memory store's
broadcasters would send it: one write per member for each room's messages of the hand-over
(not one per message when rooms interleave), each room in the bus's order, and a frame for
one user after every room message that came before it."""

from __future__ import annotations

import logging

import attrs
import pytest

from aleatoria import messages as m
from aleatoria.frames import text_frame
from aleatoria.hub import Client, open_hub
from aleatoria.limits import RateLimiter
from aleatoria.presence import member_frame
from aleatoria.router import Router, user_envelope
from aleatoria.store.memory import MemoryStore


@attrs.define
class _Recorder:
    """Stands in for a WebSocket: each write (``send_now``) or queued frame (``send``) with
    how many frames it holds."""

    writes: list[tuple[bytes, int]] = attrs.Factory(list)
    close_code: int | None = None

    def send_now(self, data: bytes, frames: int = 1) -> None:
        self.writes.append((data, frames))

    def send(self, data: bytes, frames: int = 1) -> None:
        self.writes.append((data, frames))

    def flush(self) -> None:
        pass


def _frames(*payloads: bytes) -> bytes:
    return b"".join(text_frame(p) for p in payloads)


async def test_a_hand_over_sends_each_room_in_one_write_per_member_in_order() -> None:
    async with open_hub(0.0) as hub:
        router = Router(hub, MemoryStore(ttl_seconds=60, history_max=10))
        sockets = {user: _Recorder() for user in ("ann", "bob", "cat")}
        for user, ws in sockets.items():
            client = Client(user=user, ws=ws, limiter=RateLimiter(0, 1, 1))  # type: ignore[arg-type]
            hub.clients[user] = client
            hub.join(client, "North" if user != "cat" else "South")
        dm = b'{"type":"chat_message","toUser":"ann"}'
        router.on_bus_messages(
            [
                ("North", b'{"n":1}'),
                ("South", b'{"s":1}'),
                ("North", b'{"n":2}'),
                ("South", b'{"s":2}'),
                (None, user_envelope("ann", m.CHAT_MESSAGE, dm)),
                ("North", b'{"n":3}'),
                ("South", b'{"s":3}'),
            ]
        )
        north = [(_frames(b'{"n":1}', b'{"n":2}'), 2), (text_frame(b'{"n":3}'), 1)]
        assert [north[0], (text_frame(dm), 1), north[1]] == sockets["ann"].writes
        assert north == sockets["bob"].writes
        # The frame for ann ends every room's run, so South's third message is a write of its own.
        assert [(_frames(b'{"s":1}', b'{"s":2}'), 2), (text_frame(b'{"s":3}'), 1)] == sockets["cat"].writes
        router.on_bus_messages([("South", b'{"s":4}'), ("North", b'{"n":4}'), ("South", b'{"s":5}')])
        assert (_frames(b'{"s":4}', b'{"s":5}'), 2) == sockets["cat"].writes[-1]
        assert (text_frame(b'{"n":4}'), 1) == sockets["bob"].writes[-1]


async def test_a_level_2_item_keeps_its_place_in_its_room() -> None:
    """A presence event goes to the level-2 members after its room's earlier messages and
    before its later ones (the room's run is cut there); a level-1 member never sees it."""
    async with open_hub(0.0) as hub:
        router = Router(hub, MemoryStore(ttl_seconds=60, history_max=10))
        sockets = {user: _Recorder() for user in ("old", "new")}
        for user, ws in sockets.items():
            client = Client(user=user, ws=ws, limiter=RateLimiter(0, 1, 1), level2=user == "new")  # type: ignore[arg-type]
            hub.clients[user] = client
            hub.join(client, "North")
        joined = b"2M" + f"{m.MEMBER_JOINED} dan".encode()
        router.on_bus_messages([("North", b'{"n":1}'), ("North", joined), ("North", b'{"n":2}')])
        event = text_frame(member_frame(m.MEMBER_JOINED, "North", "dan", "new"))
        assert [(text_frame(b'{"n":1}'), 1), (event, 1), (text_frame(b'{"n":2}'), 1)] == sockets["new"].writes
        assert [(text_frame(b'{"n":1}'), 1), (text_frame(b'{"n":2}'), 1)] == sockets["old"].writes


async def test_an_item_its_handler_cannot_take_costs_that_item_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hand-over item whose handler raises (a bug reached by another instance's message: a
    resume token did so once) is logged with its traceback and skipped; the room messages
    and the DM around it are delivered. Before, the error left the whole hand-over and the
    bus dropped the batch, other users' messages with it, and reconnected."""

    def broken(*args: object) -> None:
        raise RuntimeError("a handler's bug")

    async with open_hub(0.0) as hub:
        router = Router(hub, MemoryStore(ttl_seconds=60, history_max=10))
        router.resume_handlers = (broken, broken)
        ws = _Recorder()
        client = Client(user="ann", ws=ws, limiter=RateLimiter(0, 1, 1), level2=True)  # type: ignore[arg-type]
        hub.clients["ann"] = client
        hub.join(client, "North")
        dm = b'{"type":"chat_message","toUser":"ann"}'
        router.presence.on_room_item = broken  # type: ignore[method-assign,assignment]
        with caplog.at_level(logging.ERROR, logger="aleatoria.router"):
            router.on_bus_messages(
                [
                    ("North", b'{"n":1}'),
                    (None, b"Rann conn-1 token\n"),
                    (None, user_envelope("ann", m.CHAT_MESSAGE, dm)),
                    ("North", b"2M" + f"{m.MEMBER_JOINED} dan".encode()),
                    ("North", b'{"n":2}'),
                ]
            )
        assert [(text_frame(b'{"n":1}'), 1), (text_frame(dm), 1), (text_frame(b'{"n":2}'), 1)] == ws.writes
        failed = [r for r in caplog.records if "event=bus_item_failed" in r.getMessage()]
        assert 2 == len(failed)
        assert all(r.exc_info is not None and r.exc_info[0] is RuntimeError for r in failed)
