"""The WebSocket frame codec, without I/O: server frames out, the common client frames in.

How this works. Server frames are unmasked, so one frame's bytes (``text_frame``) can go to
every member of a room. Inbound, ``FrameReader.parse`` unwraps the frames nearly every
client sends -- whole, masked, final text or binary frames under 64 KiB, and pings and
pongs -- and stops at the first frame that is anything else: from there on wsproto runs the
connection (``aleatoria.connection``), so edge-case behaviour (fragments, closes, bad UTF-8,
unmasked frames, reserved bits, oversize frames) is wsproto's. tests/test_frames.py feeds
both paths the same byte streams and requires the same outcome.

Why a fast path at all: wsproto spends about 75 Python calls (24 us on the reference VM) on
each frame, as much as the session spends acting on the message. Pings stay here so that a
flood of them costs ~1 us a frame up to the frame budget, not wsproto's 24 us plus a send.

Every frame counts (PROTOCOL.md section 16): pings, pongs, a peer's close and every frame of
a fragmented message take a token from the reader's bucket (``frame_rate`` per second,
``frame_burst`` at most), refilled from the time the caller passes in (the time of the last
``recv``, so no clock is read per frame). A data frame that is a whole message costs nothing
here: the message rate limit (section 4) counts it as a message.

Nothing here imports trio or touches a socket: tests/test_frame_codec.py drives it with
plain bytes.
"""

from __future__ import annotations

import math
import struct

from wsproto.frame_protocol import XorMaskerSimple

__all__ = [
    "ABNORMAL",
    "GOING_AWAY",
    "INVALID_DATA",
    "MESSAGE_TOO_BIG",
    "PING_FRAME",
    "POLICY_VIOLATION",
    "PROTOCOL_ERROR",
    "REPLACED",
    "TOKEN_EXPIRED",
    "TOO_MANY_FRAMES",
    "TRY_AGAIN_LATER",
    "FrameReader",
    "Message",
    "text_frame",
]

# Close codes used by the server (RFC 6455 and PROTOCOL.md section 5).
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
TRY_AGAIN_LATER = 1013
REPLACED = 4001
TOKEN_EXPIRED = 4002
BANNED = 4003  # banned or kicked by an operator (PROTOCOL.md section 13)
ABNORMAL = 1006  # never sent: the code a connection ends with when TCP broke

TOO_MANY_FRAMES = "too many frames"  # the close reason with POLICY_VIOLATION for the budget

PING_FRAME = b"\x89\x00"

# A complete inbound message: bytes from the fast path; from wsproto, str for a text message
# and bytes or bytearray for a binary one (the session decodes all three alike).
Message = str | bytes | bytearray

_TEXT = 0x1
_BINARY = 0x2
_PING = 0x9
_PONG = 0xA
_FAST_OPCODES = frozenset((_TEXT, _BINARY, _PING, _PONG))
# The fast path's largest payload: a 16-bit length. Longer frames are rare and wsproto's.
_FAST_MAX = 65535


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


class FrameReader:
    """One connection's inbound fast path and frame budget.

    State: ``partial`` (bytes received and not parsed yet: the start of a frame, or what
    came with the handshake) and the budget's bucket. ``parse`` is called once per
    ``recv``; ``take_frame`` is also what the wsproto path spends the budget with.
    """

    # Slots: one reader per connection, and an idle connection is mostly its objects.
    __slots__ = ("_burst", "_limit", "_rate", "_stamp", "_tokens", "partial")

    def __init__(
        self,
        *,
        max_message_bytes: int,
        frame_rate: float,
        frame_burst: int,
        now: float,
        partial: bytes = b"",
    ) -> None:
        self.partial = partial
        self._limit = min(max_message_bytes, _FAST_MAX)
        # The frame budget, a token bucket; off (rate 0) is a bucket that never empties.
        on = frame_rate > 0
        self._rate = frame_rate if on else 0.0
        self._burst = float(frame_burst) if on else math.inf
        self._tokens = self._burst
        self._stamp = now

    def take_partial(self) -> bytes:
        """The bytes not parsed yet, handed over (to wsproto) and forgotten here."""
        partial, self.partial = self.partial, b""
        return partial

    def take_frame(self, now: float) -> bool:
        """Take one frame from the frame budget at time ``now``; False when it is spent."""
        tokens = self._tokens + (now - self._stamp) * self._rate
        self._stamp = now
        if tokens > self._burst:
            tokens = self._burst
        self._tokens = tokens = tokens - 1.0
        return tokens >= 0.0

    def parse(self, data: bytes, now: float, messages: list[Message], pongs: list[bytes]) -> bytes | int:
        """Parse ``data`` (after what is left of earlier calls) at time ``now``: append each
        whole message's payload to ``messages`` and each pong to send (for a ping) to
        ``pongs``, both in order; the caller sends the pongs before acting on the messages.

        Returns the bytes from the first frame the fast path does not take, for wsproto to
        run the connection from (b"" when every complete frame was taken: an incomplete
        one waits in ``partial``); or, when the frame budget is spent, the close code to
        fail the connection with (``POLICY_VIOLATION``, reason ``TOO_MANY_FRAMES``):
        nothing after that frame is parsed. The only failure decided here: every other
        fault is left to wsproto, which fails the connection as RFC 6455 says.
        """
        # The per-frame loop below is the server's hottest code: keep it free of calls and
        # allocations beyond the payload's own (measure before and after any change).
        if self.partial:
            data, self.partial = self.partial + data, b""
        end = len(data)
        limit = self._limit
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
                if not self.take_frame(now):
                    return POLICY_VIOLATION
                if opcode == _PING:
                    mask = data[start - 4 : start]
                    key = int.from_bytes((mask * (size // 4 + 1))[:size], "little")
                    payload = (int.from_bytes(data[start:stop], "little") ^ key).to_bytes(size, "little")
                    pongs.append(bytes((0x8A, size)) + payload)
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
                    return data[pos:]  # wsproto fails it with 1007
            messages.append(payload)
            pos = stop
        if pos < end:
            self.partial = data[pos:]  # under one frame of at most 64 KiB
        return b""
