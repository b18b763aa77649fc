"""Tokens (PROTOCOL.md section 8): HS256 JWTs whose ``sub`` is the userId."""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from collections.abc import Iterator

import jwt

ALGORITHM = "HS256"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# HS256 keys shorter than this are weak (RFC 7518 section 3.2). The server and the token
# command say so in their own words, once; PyJWT would warn on every token it handles.
MIN_SECRET_BYTES = 32


@contextlib.contextmanager
def _quiet_about(secret: str) -> Iterator[None]:
    """PyJWT's InsecureKeyLengthWarning silenced for a short ``secret`` (a long one costs
    nothing: the warning cannot come, and the filters are left alone)."""
    if len(secret.encode()) >= MIN_SECRET_BYTES:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The HMAC key is \d+ bytes long")
        yield


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '1h', '2d' -> seconds. Raises ValueError."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 1h, 2d)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def make_token(user: str, secret: str, ttl_seconds: float, *, now: float | None = None) -> str:
    """A token for ``user`` valid for ``ttl_seconds``."""
    issued = int(time.time() if now is None else now)
    claims = {"sub": user, "iat": issued, "exp": issued + int(ttl_seconds)}
    with _quiet_about(secret):
        return jwt.encode(claims, secret, algorithm=ALGORITHM)


class TokenRefused(Exception):
    """A token does not let its user in; the text says why and never echoes the token."""


def token_expiry(token: str | None, user: str, secret: str) -> int:
    """The ``exp`` (unix seconds) of a valid token for ``user``. Raises TokenRefused."""
    if not token:
        raise TokenRefused("missing token")
    try:
        with _quiet_about(secret):
            claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]})
    except jwt.ExpiredSignatureError:
        raise TokenRefused("token expired") from None
    except jwt.InvalidSignatureError:
        raise TokenRefused("token signature invalid") from None
    except jwt.InvalidTokenError:
        raise TokenRefused("token malformed") from None
    if claims.get("sub") != user:
        raise TokenRefused("token is for another user")
    exp = claims["exp"]
    if type(exp) not in (int, float):
        raise TokenRefused("token malformed")
    return int(exp)


def token_problem(token: str | None, user: str, secret: str) -> str | None:
    """Why ``token`` does not let ``user`` in, or None if it does. Never echoes the token."""
    try:
        token_expiry(token, user, secret)
    except TokenRefused as exc:
        return str(exc)
    return None
