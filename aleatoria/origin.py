"""The Origin check of the WebSocket handshake (PROTOCOL.md sections 2 and 16), pure.

Same-origin (the page was served by this host:port) is trusted only when the request's
``Host`` is one of ours (``allowed_hosts``): otherwise DNS rebinding would let a hostile
page, whose name now resolves to 127.0.0.1, connect as a same-origin client.
"""

from __future__ import annotations

from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalise(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin, with the scheme's default port filled in."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if not scheme or not host:
        return None
    if port is None:
        port = _DEFAULT_PORTS.get(scheme)
        if port is None:
            return None
    return scheme, host, port


def host_entry(entry: str) -> tuple[str, int | None] | None:
    """(host, port or None) of an ``allowed_hosts`` entry (a name, name:port or an IPv6
    literal with or without brackets), or None when it is not one: a URL
    (``https://chat.example.com``) or a bad port would match no Host header."""
    if "/" in entry:
        return None
    host, port = _host_port(entry if not _bare_ipv6(entry) else f"[{entry}]")
    return (host, port) if host else None


def _host_port(host_header: str) -> tuple[str, int | None]:
    try:
        parts = urlsplit("//" + host_header.strip())
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return "", None


class OriginPolicy:
    """Decides whether a browser origin may open a WebSocket."""

    def __init__(
        self,
        allowed: tuple[str, ...],
        require_origin: bool,
        hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "[::1]"),
    ) -> None:
        self.allow_any = "*" in allowed
        self.require_origin = require_origin
        self._allowed = {n for n in (normalise(a) for a in allowed if a != "*") if n is not None}
        self.any_host = "*" in hosts
        # Entries name a host (any port) or host:port; IPv6 literals with or without brackets.
        self._hosts: set[tuple[str, int | None]] = set()
        for entry in hosts:
            parsed = host_entry(entry) if entry != "*" else None
            if parsed is not None:
                self._hosts.add(parsed)

    def trusts_host(self, host: str, port: int | None) -> bool:
        """Whether a request to ``host:port`` (its Host header) may count as same-origin."""
        return self.any_host or (host, None) in self._hosts or (host, port) in self._hosts

    def allows(self, origin: str | None, host_header: str | None) -> bool:
        if origin is None:
            return not self.require_origin
        if self.allow_any:
            return True
        normal = normalise(origin)
        if normal is None:
            return False  # includes the opaque origin "null"
        if normal in self._allowed:
            return True
        # Same origin: the page was served by this host:port (the bundled demo client), and
        # the host is one of ours (not a rebound name).
        if host_header:
            host, port = _host_port(host_header)
            scheme, origin_host, origin_port = normal
            if port is None:
                port = _DEFAULT_PORTS.get(scheme)
            return (origin_host, origin_port) == (host, port) and self.trusts_host(host, port)
        return False


def _bare_ipv6(entry: str) -> bool:
    return entry.count(":") > 1 and not entry.startswith("[")
