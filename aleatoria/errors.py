"""Errors, split by whose fault they are: one tree.

``AleatoriaError``
- ``ClientError``: the peer sent something we will not act on. It carries the reply the
  client gets (``code`` and ``text``) and, for abuse, the ``close_code`` that ends the
  connection; otherwise the server answers and goes on.
  - ``InvalidMessage``: the frame is not a well-formed envelope (answered with
    ``error_response`` and its ``details``).
  - ``AbuseDetected``: a client kept exceeding the rate limit (closed with 1008).
- ``StoreUnavailable``: our dependency (Redis) failed; the store degrades to memory.
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
INVALID_MESSAGE = "invalid_message"  # counted in metrics; the client gets error_response

NOT_IN_ROOM_TEXT = "You are not in that room. Join the room first."


class AleatoriaError(Exception):
    """The base of every error the server raises on purpose."""


class ClientError(AleatoriaError):
    """The client's request is refused with an ``error`` reply (``code``, ``text``); with a
    ``close_code`` the connection is closed instead of answered."""

    close_code: int | None = None

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class InvalidMessage(ClientError):
    """The frame is not a well-formed envelope: answered with ``error_response``."""

    def __init__(self, details: str) -> None:
        super().__init__(INVALID_MESSAGE, "Invalid message structure")
        self.details = details


class AbuseDetected(ClientError):
    """A client kept exceeding the rate limit: close it with 1008."""

    close_code = 1008

    def __init__(self) -> None:
        super().__init__(RATE_LIMITED, "rate limit exceeded")


class StoreUnavailable(AleatoriaError):
    """The external store (Redis) failed or timed out; callers fall back to memory."""
