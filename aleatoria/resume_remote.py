"""Resume on another instance sharing Redis (PROTOCOL.md sections 9 and 15).

How this works. A kept session stays registered in Redis presence on its instance (the
owner, A) until its window passes: presence is the record of who owns it, expiring with
A's heartbeat if A dies. A connection with ``resume=<token>`` that reaches another instance
(B), where the token is unknown:
1. B holds the new client's frames in a holding outbox, registers the connection
   (``store.connect``: presence moves to B at once, so every frame routed from now on comes
   to B) and gets A's instance and connection id in the ``Takeover``, with the rooms, pool
   place and match, which B adopts as for any connection that moved.
2. Instead of the eviction notice, B sends A a resume request on A's instance channel:
   ``R<user> <connection> <B>\\n<token>`` (the token rides in the body: heads may be logged).
3. A checks the token against its kept session (or its live one, whose drop it has not
   noticed yet), takes it if it matches, forgets the user locally (as an eviction does)
   and answers on B's channel: ``Q<user> ok\\n<the kept frames>`` or ``Q<user> <reason>\\n``.
   Redis keeps one channel's order, and everything routed to A before step 1 was published
   before the request, so A's kept frames are complete.
4. B sends ``welcome {resumed: true, missed: N}``, A's frames in order, then what it held
   meanwhile -- without the room messages A had too (both instances were subscribed in
   the overlap; deduplicated by ``messageId``), then live traffic. A failure (or no answer
   within ``_ANSWER_TIMEOUT``) is a fresh session: what B adopted is left at once (members
   told, pool left, ``hangup peer_left``), and B's held frames are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import attrs
import orjson
import trio

from aleatoria.hub import Hub
from aleatoria.resume import ENDED, OTHER_USER, UNKNOWN, KeptOutbox, Resumes
from aleatoria.router import Router

log = logging.getLogger("aleatoria.resume")

_ANSWER_TIMEOUT = 3.0
UNREACHABLE = "unreachable"  # the owner did not answer in time (it died)


def split_frames(data: bytes) -> Iterator[bytes]:
    """The single frames in ``data``: server frames (unmasked), possibly joined."""
    pos, end = 0, len(data)
    while pos < end:
        size, head = data[pos + 1] & 0x7F, 2
        if size == 126:
            size, head = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
        elif size == 127:
            size, head = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
        yield data[pos : pos + head + size]
        pos += head + size


def room_message_id(frame: bytes) -> str | None:
    """The messageId of a room chat message frame, else None (only those can reach both
    instances: direct frames are routed to one)."""
    size, head = frame[1] & 0x7F, 2
    if size == 126:
        head = 4
    elif size == 127:
        head = 10
    if frame[0] & 0x0F != 0x1 or b'"room"' not in frame:
        return None
    try:
        message = orjson.loads(frame[head:])
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict) or message.get("type") != "chat_message" or "room" not in message:
        return None
    found = message.get("messageId")
    return found if isinstance(found, str) else None


@attrs.define(eq=False)
class _Waiter:
    done: trio.Event = attrs.Factory(trio.Event)
    status: str = UNREACHABLE
    frames: bytes = b""


class RemoteResumes:
    """Both sides of a resume across instances: the asking one (B) and the owner (A)."""

    def __init__(self, hub: Hub, router: Router, resumes: Resumes) -> None:
        self._hub = hub
        self._router = router
        self._resumes = resumes
        self._waiting: dict[str, _Waiter] = {}
        router.resume_handlers = (self._asked, self._answered)

    # -- the instance the client reconnected to (B) ---------------------------------------

    def holding(self) -> KeptOutbox:
        """An outbox where frames for the reconnecting client wait until the owner answered
        (the caller swaps it in as the client's socket, and back)."""
        return KeptOutbox(self._resumes.outbox_frames, self._resumes.outbox_bytes, lambda _: None)

    async def ask(self, instance: str, user: str, connection: str, token: str) -> tuple[str, bytes]:
        """Ask ``instance`` to hand over ``user``'s session ``connection`` if ``token`` is
        its. Returns ("ok", frames) or (reason, b""). Waits at most ``_ANSWER_TIMEOUT``."""
        waiter = self._waiting[user] = _Waiter()
        try:
            self._router.ask_resume(instance, user, connection, token)
            with trio.move_on_after(_ANSWER_TIMEOUT):
                await waiter.done.wait()
        finally:
            if self._waiting.get(user) is waiter:
                del self._waiting[user]
        return waiter.status, waiter.frames

    def _answered(self, user: str, status: str, frames: bytes) -> None:
        waiter = self._waiting.get(user)
        if waiter is not None and not waiter.done.is_set():
            waiter.status, waiter.frames = status, frames
            waiter.done.set()

    @staticmethod
    def merge(owner_frames: bytes, holding: KeptOutbox) -> list[bytes]:
        """The frames to replay, in order: the owner's, then the held ones that are not
        among them (room messages both instances delivered in the overlap)."""
        seen: set[str] = set()
        out: list[bytes] = []
        for frame in split_frames(owner_frames):
            message_id = room_message_id(frame)
            if message_id is not None:
                seen.add(message_id)
            out.append(frame)
        for data, _ in holding.frames:
            for frame in split_frames(data):
                message_id = room_message_id(frame)
                if message_id is None or message_id not in seen:
                    out.append(frame)
        return out

    # -- the owner (A) -------------------------------------------------------------------

    def _asked(self, user: str, connection: str, instance: str, token: str) -> None:
        """``instance`` asks for ``user``'s session ``connection`` with ``token``."""
        resumes, status, frames = self._resumes, UNKNOWN, b""
        kept = resumes.kept.get(user)
        client = self._hub.clients.get(user)
        if kept is not None and kept.client.connection == connection:
            taken = resumes.take(user, token)
            if taken is not None:
                status = "ok"
                frames = b"".join(data for data, _ in taken.outbox.frames)
            else:
                status = resumes.check(user, token) or resumes.reason_for(user)
        elif client is not None and client.connection == connection:
            live = resumes.live_token(client)
            if live is not None and live == token:
                resumes.take_live(client)
                status = "ok"
            else:
                status = OTHER_USER if resumes.check(user, token) == OTHER_USER else UNKNOWN
        else:
            status = resumes.check(user, token) or ENDED
        # Either way the user is the asker's now (presence moved): forget it here.
        self._router.evict_here(user, connection)
        self._router.answer_resume(instance, user, status, frames)
        log.info("event=resume_handed_over user=%s to_instance=%s status=%s", user, instance, status)
