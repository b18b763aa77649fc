"""Shared fixtures, and the test tiers (docs/architecture.md, "Tests").

A test is in the loopback tier when it is marked ``loopback`` (a file says
``pytestmark = pytest.mark.loopback``; everything under redis/, scaleout/ and browser/ is);
every other test is pure or in memory, and fails if it binds or connects a socket (a
``socket.socketpair()`` is allowed: it has no address). The helpers live in ``support.py``
(both tiers) and ``inmemory.py``.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Generator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from inmemory import InMemoryServer, inmemory_server
from support import RunningServer, connect, running_server

_LOOPBACK_DIRS = ("redis", "scaleout", "browser")
_HERE = Path(__file__).parent


class _Guard:
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
    _Guard.wrap(_name)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "loopback: may bind and connect sockets (real TCP, Redis, subprocesses, browser)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.path.relative_to(_HERE).parts if item.path.is_relative_to(_HERE) else ()
        if parts and parts[0] in _LOOPBACK_DIRS:
            item.add_marker(pytest.mark.loopback)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    _Guard.active = item.get_closest_marker("loopback") is None
    _Guard.violations = []
    try:
        return (yield)
    finally:
        _Guard.active = False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, None]:
    yield
    if _Guard.violations:
        pytest.fail(f"an in-memory test used a socket: {_Guard.violations[:3]}")


@pytest.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[InMemoryServer | RunningServer]:
    """The test's tier's server with the default configuration: ``inmemory_server()``, or
    ``running_server()`` (a real port) for a ``loopback`` test."""
    if request.node.get_closest_marker("loopback") is None:
        async with inmemory_server() as in_memory:
            yield in_memory
    else:
        async with running_server() as running:
            yield running


@pytest.fixture
def connect_to(server: InMemoryServer | RunningServer) -> Callable[..., Any]:
    """``async with connect_to("alice") as alice:``, a WebSocket to the ``server`` fixture."""

    def opener(user: str, room: str | None = None, **kw: Any) -> Any:
        return connect(server, user, room, **kw)

    return opener
