"""Presence events and room ``typing`` for level-2 members (PROTOCOL.md section 11).

How this works. Each hub room keeps the set of its level-2 members (``Room.level2``); a
level-1 member is never in it, so level-1 connections pay nothing here and never receive
these frames. An event for a room goes to its level-2 members on every instance:
- without a usable bus (memory store, Redis down) to this instance's members only;
- with the bus, it is published on the room's channel like a chat message, as a bus item
  that starts with ``2`` (a chat message is JSON and starts with ``{``): ``2M<type> <user>``
  for ``member_joined``/``member_left``, ``2T<sender>\\n<frame JSON>`` for ``typing``.
  Every instance with members of the room -- this one too -- delivers it when Redis hands
  it back (``Router.on_bus_messages``), so each member gets it at most once.
``member_*`` frames carry ``toUser`` (server messages name their receiver), so they are
built per receiver; they are rare (a join, a leave). A ``typing`` frame is the same bytes
for every receiver, like a chat message.
"""

from __future__ import annotations

from aleatoria import messages as m
from aleatoria.codec import encode_reply
from aleatoria.frames import text_frame
from aleatoria.hub import Hub
from aleatoria.store.base import Bus

LEVEL2_ITEM = 0x32  # b"2"[0]: the first byte of a level-2 room item on the bus


def member_frame(kind: str, room: str, user: str, to: str) -> bytes:
    """The JSON of ``member_joined``/``member_left`` about ``user`` in ``room``, for ``to``."""
    return encode_reply(kind, to, m.MemberEvent(room=room, user=user), room)


class Presence:
    """Tells level-2 room members of joins, leaves and typing, on every instance."""

    def __init__(self, hub: Hub, bus: Bus | None) -> None:
        self._hub = hub
        self._bus = bus

    def member(self, kind: str, room: str, user: str) -> None:
        """``user`` joined (``m.MEMBER_JOINED``) or left (``m.MEMBER_LEFT``) ``room``."""
        bus = self._bus
        if bus is not None and bus.usable:
            bus.publish_room(room, b"2M" + f"{kind} {user}".encode())
        else:
            self.member_here(kind, room, user)

    def typing(self, room: str, sender: str, data: bytes) -> None:
        """``sender``'s ``typing`` frame (JSON) to the other level-2 members of ``room``."""
        bus = self._bus
        if bus is not None and bus.usable:
            bus.publish_room(room, b"2T" + sender.encode() + b"\n" + data)
        else:
            self.typing_here(room, sender, data)

    def on_room_item(self, room: str, data: bytes) -> None:
        """A level-2 item of ``room`` came from the bus (see the module docstring)."""
        kind = data[1:2]
        if kind == b"M":
            fields = data[2:].decode(errors="replace").split(" ")
            if len(fields) == 2 and fields[0] in (m.MEMBER_JOINED, m.MEMBER_LEFT):
                self.member_here(fields[0], room, fields[1])
        elif kind == b"T":
            sender, _, frame = data[2:].partition(b"\n")
            self.typing_here(room, sender.decode(errors="replace"), frame)

    def member_here(self, kind: str, room: str, user: str) -> None:
        found = self._hub.rooms.get(room)
        if found is None or not found.level2:
            return
        sent = 0
        for member in found.level2:
            if member != user:
                found.members[member].send(text_frame(member_frame(kind, room, user, member)))
                sent += 1
        self._hub.stats.messages_out[kind] += sent

    def typing_here(self, room: str, sender: str, data: bytes) -> None:
        found = self._hub.rooms.get(room)
        if found is None or not found.level2:
            return
        frame = text_frame(data)
        sent = 0
        for member in found.level2:
            if member != sender:
                found.members[member].send(frame)
                sent += 1
        self._hub.stats.messages_out[m.TYPING] += sent
