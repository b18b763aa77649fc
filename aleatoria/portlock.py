"""One ``--workers`` deployment per port: a lock keyed by the port number.

Why. ``--workers`` listens with SO_REUSEPORT, and the kernel lets any process of the same
user join a SO_REUSEPORT port: a second ``aleatoria serve --workers N`` on a port another
deployment holds would start without a word, and the kernel would split new connections
between two servers (two configurations, perhaps two Redis). A plain listener (a single
process, another program) is refused by the kernel already; this covers the case it lets
through.

How. The parent binds a Unix socket in Linux's abstract namespace, named by the port
(``\\0aleatoria/port/8085``). Abstract names are per network namespace — exactly the scope
of TCP ports — and are not files: ``PrivateTmp`` and other mount namespaces do not hide
them, and the kernel releases the name when its holder exits, however it exits (no stale
lock after ``kill -9``). The lock socket listens without ever accepting, so a refused
starter can connect and read the holder's pid (SO_PEERCRED) for its message.

The key is the port alone, not host and port: SO_REUSEPORT also lets ``0.0.0.0:P`` and
``127.0.0.1:P`` be held by two deployments, which overlap. Two ``--workers`` deployments on
one machine need two ports. Elsewhere than Linux (no abstract namespace) there is no lock.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys

_PREFIX = "aleatoria/port/"


class PortHeld(OSError):
    """Another ``--workers`` deployment holds the port (errno EADDRINUSE)."""

    def __str__(self) -> str:
        return str(self.strerror)  # the sentence alone, without "[Errno 98]"


def lock_port(port: int) -> socket.socket | None:
    """Take the lock of ``port`` for this process; the returned socket holds it until closed
    (or until the process exits). None where there is no abstract namespace (not Linux).
    Raises PortHeld, naming the holder's pid when it can be read."""
    if not sys.platform.startswith("linux"):
        return None
    name = f"\0{_PREFIX}{port}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(name)
        sock.listen(16)  # never accepted: queued connections only tell starters the pid
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        holder = _holder_pid(name)
        who = f" (pid {holder})" if holder else ""
        raise PortHeld(
            errno.EADDRINUSE,
            f"port {port} is held by another aleatoria --workers deployment{who}: "
            "stop it, or give this one another --port",
        ) from None
    return sock


def _holder_pid(name: str) -> int | None:
    """The pid of the process listening on the abstract socket ``name``, if it answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(name)
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
    pid: int = struct.unpack("3i", creds)[0]
    return pid or None
