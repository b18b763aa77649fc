"""Shared fixtures; the helpers they use live in ``support.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from support import RunningServer, connect, running_server


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    async with running_server() as running:
        yield running


@pytest.fixture
def connect_to(server: RunningServer) -> Callable[..., Any]:
    """``async with connect_to("alice") as alice:`` against the ``server`` fixture."""

    def opener(user: str, room: str | None = None, **kw: Any) -> Any:
        return connect(server, user, room, **kw)

    return opener
