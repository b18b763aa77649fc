"""The server's JSON endpoints as the Redis and scale-out tests read them, /health above all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import trio
from support import Target, tcp

OPERATIONS = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


def documented_health_bodies() -> list[dict[str, Any]]:
    """The JSON examples of docs/operations.md's /health section, in order: one process's
    body, then the --workers parent's."""
    section = OPERATIONS.read_text().split("### /health", 1)[1].split("### /metrics", 1)[0]
    return [json.loads(block.split("```", 1)[0]) for block in section.split("```json")[1:]]


async def get_json(server: Target | int, path: str) -> dict[str, Any]:
    """GET a JSON endpoint of the server (``server``: a ``Target``, or a port on 127.0.0.1)."""
    where = tcp(server)
    port = where.port
    async with await where.open_stream() as stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    _, _, body = data.partition(b"\r\n\r\n")
    result: dict[str, Any] = orjson.loads(body)
    return result


async def wait_for_health(
    server: Target | int, redis: str, bus: str | None = None, *, timeout: float = 20.0
) -> None:
    """Poll /health until ``redis`` (and ``bus``, when given) is in that state: the store and
    the bus change state on their own, when Redis fails or comes back."""
    with trio.fail_after(timeout):
        while True:
            health = await get_json(server, "/health")
            if redis == health["redis"] and bus in (None, health["bus"]):
                return
            await trio.sleep(0.05)  # /health is the observable; it has no push channel
