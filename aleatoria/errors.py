"""Errors, split by whose fault they are.

``ClientError``: the peer sent something we will not act on. It carries the error reply the
client gets (and, for protocol violations, a close code); the server goes on.
``StoreUnavailable``: our dependency (Redis) failed; the store degrades to memory.
"""

from __future__ import annotations

# Machine-readable codes of ``error`` replies (PROTOCOL.md section 4).
NOT_IN_ROOM = "not_in_room"
INVALID_TARGET = "invalid_target"
UNKNOWN_TYPE = "unknown_type"
INVALID_PAYLOAD = "invalid_payload"
TOO_LARGE = "too_large"
RATE_LIMITED = "rate_limited"
PEER_UNAVAILABLE = "peer_unavailable"
LIMIT_REACHED = "limit_reached"
INVALID_TOKEN = "invalid_token"

NOT_IN_ROOM_TEXT = "You are not in that room. Join the room first."


class ClientError(Exception):
    """The client's request is refused with an ``error`` reply; the connection stays open."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class InvalidMessage(Exception):
    """The frame is not a well-formed envelope: answered with ``error_response``."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self.details = details


class StoreUnavailable(Exception):
    """The external store (Redis) failed or timed out; callers fall back to memory."""
