"""Helpers of the Redis tests: the server, in-process or as a process. The redis-server
itself is in ``redis_server.py``, /health in ``health.py``, the in-process server and clients
in ``support.py``."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from aleatoria.config import Config


def server_config(url: str, **overrides: Any) -> Config:
    values: dict[str, Any] = {"port": 0, "redis_url": url, "rate_limit": 0, "match_rate": 0}
    values.update(overrides)
    return Config(**values)


async def wait_until(predicate: Callable[[], bool], *, timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` (a check of Redis or of a process) holds."""
    with trio.fail_after(timeout):
        while True:
            if predicate():
                return
            await trio.sleep(0.02)  # the observed system has no push channel to wait on


@asynccontextmanager
async def serve_process(url: str, *flags: str) -> AsyncIterator[int]:
    """``python -m aleatoria serve`` as a subprocess; yields its port once it listens. On exit
    it gets SIGTERM and must exit 0."""
    command = [sys.executable, "-m", "aleatoria", "serve", "--port", "0", "--redis-url", url]
    command += ["--rate-limit", "0", "--match-rate", "0", *flags]
    process = await trio.lowlevel.open_process(command, stderr=subprocess.PIPE)
    assert process.stderr is not None
    stderr = process.stderr
    log = bytearray()
    listening = trio.Event()
    port = 0

    async def read_log() -> None:
        nonlocal port
        async for chunk in stderr:
            log.extend(chunk)
            found = _LISTENING.search(log)
            if found and not listening.is_set():
                port = int(found.group(1))
                listening.set()
        listening.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_log)
            with trio.fail_after(15):
                await listening.wait()
            assert port, f"server did not start: {log.decode(errors='replace')}"
            try:
                yield port
            finally:
                process.send_signal(signal.SIGTERM)
                with trio.fail_after(15):
                    code = await process.wait()
                assert code == 0, f"exit {code}: {log.decode(errors='replace')[-3000:]}"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@asynccontextmanager
async def killable_server(url: str, *flags: str) -> AsyncIterator[tuple[int, trio.Process]]:
    """``python -m aleatoria serve`` on ``url``; yields its port and process once it listens.
    The test kills it (``kill -9`` tests); whatever is left running is killed on exit."""
    command = [sys.executable, "-m", "aleatoria", "serve", "--port", "0", "--redis-url", url]
    command += ["--rate-limit", "0", "--match-rate", "0", *flags]
    process = await trio.lowlevel.open_process(command, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert process.stderr is not None
    stderr = process.stderr
    log = bytearray()
    listening = trio.Event()

    async def read_log() -> None:
        async for chunk in stderr:
            log.extend(chunk)
            if _LISTENING.search(log):
                listening.set()
        listening.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_log)
            with trio.fail_after(15):
                await listening.wait()
            found = _LISTENING.search(log)
            assert found, f"server did not start: {log.decode(errors='replace')}"
            yield int(found.group(1)), process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


_LISTENING = re.compile(rb"listening on ws://127\.0\.0\.1:(\d+)/ws")
