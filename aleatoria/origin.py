"""The Origin check of the WebSocket handshake (PROTOCOL.md section 2), pure."""

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


def _host_port(host_header: str) -> tuple[str, int | None]:
    try:
        parts = urlsplit("//" + host_header.strip())
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return "", None


class OriginPolicy:
    """Decides whether a browser origin may open a WebSocket."""

    def __init__(self, allowed: tuple[str, ...], require_origin: bool) -> None:
        self.allow_any = "*" in allowed
        self.require_origin = require_origin
        self._allowed = {n for n in (normalise(a) for a in allowed if a != "*") if n is not None}

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
        # Same origin: the page was served by this host:port (the bundled demo client).
        if host_header:
            host, port = _host_port(host_header)
            scheme, origin_host, origin_port = normal
            if port is None:
                port = _DEFAULT_PORTS.get(scheme)
            return (origin_host, origin_port) == (host, port)
        return False
