"""The tier guard of conftest.py: while a test that is not marked ``loopback`` runs, binding
or connecting a socket fails (``socket.socketpair()`` does neither, and stays allowed)."""

from __future__ import annotations

import socket
from typing import Any, ClassVar


class Guard:
    """Refuses bind/connect while an in-memory or pure test runs, and remembers it (a server
    task may swallow the error: the test fails afterwards all the same)."""

    active: ClassVar[bool] = False
    violations: ClassVar[list[str]] = []

    @classmethod
    def wrap(cls, name: str) -> None:
        original = getattr(socket.socket, name)

        def guarded(self: socket.socket, *args: Any, **kwargs: Any) -> Any:
            if cls.active:
                what = f"socket.{name}{args!r}"
                cls.violations.append(what)
                raise OSError(f"{what}: this test is not in the loopback tier (mark it loopback)")
            return original(self, *args, **kwargs)

        setattr(socket.socket, name, guarded)


for _name in ("bind", "connect", "connect_ex"):
    Guard.wrap(_name)
