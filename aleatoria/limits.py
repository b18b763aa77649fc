"""Input limits and validation (pure): ids, content, limits, rate (PROTOCOL.md s3, s4)."""

from __future__ import annotations

import re

import attrs

from aleatoria.errors import INVALID_PAYLOAD, RATE_LIMITED, TOO_LARGE, AbuseDetected, ClientError

_ID = re.compile(r"[A-Za-z0-9_\-.@]+")

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
ID_RULE = "1–64 characters of letters, digits and _-.@"


def id_problem(value: str, max_chars: int = 64) -> str | None:
    """Why ``value`` is not a valid user or room id, or None if it is."""
    if not value:
        return "must not be empty"
    if len(value) > max_chars:
        return f"is longer than {max_chars} characters"
    if not _ID.fullmatch(value):
        return f"must be {ID_RULE}"
    return None


def check_id(field: str, value: str, max_chars: int = 64) -> str:
    """Return ``value`` if it is a valid id, else raise ClientError naming ``field``."""
    problem = id_problem(value, max_chars)
    if problem is None:
        return value
    code = TOO_LARGE if len(value) > max_chars else INVALID_PAYLOAD
    return _raise(code, f"{field} {problem}")


def _raise(code: str, text: str) -> str:
    raise ClientError(code, text)


def clamp_limit(limit: int | None) -> int:
    """``limit`` clamped to 1..200; absent means 50."""
    if limit is None:
        return DEFAULT_LIMIT
    return max(1, min(MAX_LIMIT, limit))


@attrs.define
class TokenBucket:
    """Classic token bucket: ``rate`` tokens per second up to ``burst``."""

    rate: float
    burst: float
    tokens: float = attrs.field(default=None)
    stamp: float = 0.0

    def __attrs_post_init__(self) -> None:
        if self.tokens is None:
            self.tokens = self.burst

    def take(self, now: float) -> bool:
        """Take one token at time ``now``; False when none is left."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def forget_full(buckets: dict[str, TokenBucket], now: float) -> None:
    """Drop the buckets that are full again at ``now``: a new one is the same (bounded: what
    stays is the users who took tokens within the last ``burst / rate`` seconds)."""
    for key in [k for k, b in buckets.items() if b.tokens + (now - b.stamp) * b.rate >= b.burst]:
        del buckets[key]


class RateLimiter:
    """Per-connection message rate limit, with a second bucket that tracks sustained abuse.

    Each rejected message costs one "strike"; strikes refill at half the message rate up to
    ``rate * abuse_seconds``. A client that keeps sending well over the limit runs out of
    strikes and is disconnected (1008); one that only bursts now and then never does.
    """

    def __init__(self, rate: float, burst: int, abuse_seconds: float) -> None:
        self.enabled = rate > 0
        self._messages = TokenBucket(rate, burst)
        strikes = max(1.0, rate * abuse_seconds)
        self._strikes = TokenBucket(rate / 2, strikes)
        self.rejected = 0

    def check(self, now: float) -> None:
        """Raise ClientError(rate_limited) when over the limit; AbuseDetected when sustained."""
        if not self.enabled or self._messages.take(now):
            return
        self.rejected += 1
        if not self._strikes.take(now):
            raise AbuseDetected()
        raise ClientError(RATE_LIMITED, "Too many messages: slow down.")
