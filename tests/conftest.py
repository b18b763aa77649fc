"""Shared fixtures, and the test tiers (docs/architecture.md, "Tests").

A test is in the loopback tier when it is marked ``loopback`` (a file says
``pytestmark = pytest.mark.loopback``; everything under redis/, scaleout/ and browser/ is);
every other test is pure or in memory, and fails if it binds or connects a socket (a
``socket.socketpair()`` is allowed: it has no address). The helpers live in ``support.py``
(both tiers) and ``inmemory.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Generator
from pathlib import Path
from typing import Any

import pytest
from inmemory import InMemoryServer, inmemory_server
from support import RunningServer, connect, running_server
from tiers import Guard

_LOOPBACK_DIRS = ("redis", "scaleout", "browser")
_HERE = Path(__file__).parent


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
    Guard.active = item.get_closest_marker("loopback") is None
    Guard.violations = []
    try:
        return (yield)
    finally:
        Guard.active = False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, None]:
    yield
    if Guard.violations:
        pytest.fail(f"an in-memory test used a socket: {Guard.violations[:3]}")


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
