"""ICE servers and TURN credentials (PROTOCOL.md section 14), pure.

How this works. The server does not run a TURN server; it hands browsers what they need to
use one (coturn, with ``use-auth-secret``) under the TURN REST convention
(draft-uberti-behave-turn-rest, what coturn implements): the username is
``"<expiry unix seconds>:<userId>"`` and the password ``base64(HMAC-SHA1(secret, username))``.
coturn recomputes the HMAC with its own copy of the secret and refuses the username once its
expiry has passed, so nothing is stored and no round trip to us is needed. With several
secrets (rotation) the first signs; coturn accepts any of the secrets it is given.

``ice_servers`` builds exactly what ``RTCPeerConnection`` takes as ``iceServers``: one entry
for the STUN URLs and one, with credentials, for the TURN URLs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import Any

import attrs

RELAY = "relay"
ALL = "all"
MIN_TTL = 60
MAX_TTL = 7 * 24 * 3600

# RFC 7064 (stun:) and RFC 7065 (turn:, turns:): scheme ":" host [":" port], and for TURN an
# optional "?transport=udp|tcp". A browser throws on a malformed URL and the page could make no
# call at all, so the server refuses one at start-up instead.
_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
_PORT = r"(?::(?P<port>[0-9]{1,5}))?"
_STUN_URL = re.compile(rf"stun:{_HOST}{_PORT}")
_TURN_URL = re.compile(rf"turns?:{_HOST}{_PORT}(?:\?transport=(?:udp|tcp))?")


@attrs.frozen
class IcePolicy:
    """What the server tells clients about ICE (from ``Config``)."""

    urls: tuple[str, ...] = ()
    # The first signs; all are coturn's, for rotation. Kept out of reprs (logs).
    secrets: tuple[str, ...] = attrs.field(default=(), repr=False)
    ttl: int = 3600
    relay_only: bool = False

    @property
    def configured(self) -> bool:
        """True when there is anything to tell (then ``assign_role`` carries it too)."""
        return bool(self.urls)

    @property
    def transport_policy(self) -> str:
        """``iceTransportPolicy`` for ``RTCPeerConnection``: ``relay`` in privacy mode."""
        return RELAY if self.relay_only else ALL


def is_turn_url(url: str) -> bool:
    return url.startswith(("turn:", "turns:"))


def url_problem(url: str) -> str | None:
    """Why a browser would refuse ``url`` as an ICE server URL, or None if it is fine."""
    pattern = _TURN_URL if is_turn_url(url) else _STUN_URL if url.startswith("stun:") else None
    if pattern is None:
        return "an ICE URL starts with stun:, turn: or turns: (no //, e.g. turn:turn.example.com:3478)"
    match = pattern.fullmatch(url)
    if match is None:
        return "expected stun:host[:port], turn:host[:port][?transport=udp|tcp] or turns:host[:port]"
    port = match.group("port")
    if port is not None and not 1 <= int(port) <= 65535:
        return f"port {port} is not 1..65535"
    return None


def turn_username(user: str, now: int, ttl: int) -> str:
    """The TURN REST username: valid until ``now + ttl`` (unix seconds), naming ``user``."""
    return f"{now + ttl}:{user}"


def turn_credential(secret: str, username: str) -> str:
    """The TURN REST password for ``username``: base64(HMAC-SHA1(secret, username))."""
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def ice_servers(policy: IcePolicy, user: str, now: int) -> list[dict[str, Any]]:
    """``iceServers`` for ``user`` at ``now`` (unix seconds): STUN URLs in one entry, TURN URLs
    in another with credentials valid for ``policy.ttl`` seconds. Empty when not configured."""
    stun = [url for url in policy.urls if not is_turn_url(url)]
    turn = [url for url in policy.urls if is_turn_url(url)]
    servers: list[dict[str, Any]] = []
    if stun:
        servers.append({"urls": stun})
    if turn and policy.secrets:
        username = turn_username(user, now, policy.ttl)
        servers.append(
            {"urls": turn, "username": username, "credential": turn_credential(policy.secrets[0], username)}
        )
    return servers


def policy_problem(policy: IcePolicy) -> str | None:
    """Why the server cannot hand out ``policy``, or None. Each message names the settings."""
    for url in policy.urls:
        problem = url_problem(url)
        if problem:
            return f"ALEATORIA_ICE_URLS: {url!r}: {problem}"
    has_turn = any(is_turn_url(url) for url in policy.urls)
    if has_turn and not policy.secrets:
        return (
            "ALEATORIA_ICE_URLS names a TURN server but ALEATORIA_TURN_SECRET is not set: browsers "
            "refuse turn: URLs without credentials"
        )
    if policy.secrets and not has_turn:
        return "ALEATORIA_TURN_SECRET is set but ALEATORIA_ICE_URLS has no turn: or turns: URL"
    if policy.relay_only and not has_turn:
        return (
            "ALEATORIA_RELAY_ONLY needs a turn: or turns: URL in ALEATORIA_ICE_URLS (calls could "
            "never connect)"
        )
    if not MIN_TTL <= policy.ttl <= MAX_TTL:
        return f"ALEATORIA_TURN_TTL must be {MIN_TTL}..{MAX_TTL} seconds, got {policy.ttl}"
    return None
