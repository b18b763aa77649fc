"""The tiers are enforced (conftest.py): a test that is not marked ``loopback`` cannot bind
or connect a socket, and a socket pair (the in-memory tier's connections) is allowed."""

from __future__ import annotations

import socket

import pytest
from tiers import Guard


def test_an_in_memory_test_may_not_connect_or_bind() -> None:
    """connect, connect_ex and bind are refused (and remembered, so that a refusal a server
    task swallows still fails the test)."""
    with socket.socket() as sock:
        with pytest.raises(OSError, match="not in the loopback tier"):
            sock.connect(("127.0.0.1", 9))
        with pytest.raises(OSError, match="not in the loopback tier"):
            sock.connect_ex(("127.0.0.1", 9))
        with pytest.raises(OSError, match="not in the loopback tier"):
            sock.bind(("127.0.0.1", 0))
    assert 3 == len(Guard.violations)
    Guard.violations.clear()  # this test meant them


def test_a_socket_pair_is_allowed() -> None:
    """The in-memory tier's connections: no address, no TCP."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(b"x")
        assert b"x" == theirs.recv(1)


@pytest.mark.loopback
def test_a_loopback_test_may_bind() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert 0 != sock.getsockname()[1]
