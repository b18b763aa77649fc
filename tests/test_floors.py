"""The speed floors in scripts/ are instruments: each must do the work it claims to measure."""

from __future__ import annotations

import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

pytestmark = pytest.mark.loopback  # a real process and real sockets

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


async def start_floor(nursery: trio.Nursery, script: str, *args: str) -> str:
    """Run ``scripts/script`` on a free port until ``nursery`` is cancelled; its WebSocket URL."""
    command = [sys.executable, str(SCRIPTS / script), "--port", "0", *args]
    process = await nursery.start(partial(trio.run_process, command, stdout=subprocess.PIPE, check=False))
    assert process.stdout is not None
    with trio.fail_after(10):
        line = b""
        while not line.endswith(b"\n"):
            line += await process.stdout.receive_some(1)
    return f"ws://127.0.0.1:{int(line.rsplit(b':', 1)[1])}/ws"


async def test_dm_floor_relays_a_dm_and_the_senders_copy() -> None:
    """dm_floor.py sends each text frame to its ``toUser`` and back to its sender, byte for
    byte (the reference generator's ``dm`` reads ``content`` from both), medium frames too."""
    async with trio.open_nursery() as nursery:
        base = await start_floor(nursery, "dm_floor.py")
        async with (
            open_websocket_url(f"{base}?userId=ana&room=r") as ana,
            open_websocket_url(f"{base}?userId=ben&room=r") as ben,
        ):
            for content in ("P|0|1|5|x", "Q|0|1|5|" + "y" * 300):
                message = {"type": "chat_message", "toUser": "ben", "payload": {"content": content}}
                await ana.send_message(orjson.dumps(message).decode())
                with trio.fail_after(5):
                    got, copy = await ben.get_message(), await ana.get_message()
                assert orjson.loads(got) == message
                assert orjson.loads(copy) == message
        nursery.cancel_scope.cancel()  # kills the floor


async def _next(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(5):
        message: dict[str, Any] = orjson.loads(await ws.get_message())
    return message


async def check_match_floor(base: str) -> None:
    """What match_floor.py must do for the reference generator's ``match``, as Aleatoria does
    it: pool and pick, both roles, a crossed request's assignment again, signals relayed with
    ``fromUser``, and a hangup that ends the match."""
    available, request = '{"type":"user_available_webrtc"}', '{"type":"request_random_peer","payload":{}}'
    no_peer = {"message": "No peer available at the moment. Please try again later."}
    async with (
        open_websocket_url(f"{base}?userId=ana") as ana,
        open_websocket_url(f"{base}?userId=ben") as ben,
    ):
        await ana.send_message(available)
        await ana.send_message(request)
        assert await _next(ana) == {
            "type": "no_peer_available",
            "fromUser": "system",
            "toUser": "ana",
            "payload": no_peer,
        }
        await ben.send_message(available)
        await ben.send_message(request)  # picks ana, who is pooled
        assign = {"type": "assign_role", "fromUser": "system"}
        assert await _next(ben) == {
            **assign,
            "toUser": "ben",
            "payload": {"role": "impolite", "peerId": "ana"},
        }
        polite = {**assign, "toUser": "ana", "payload": {"role": "polite", "peerId": "ben"}}
        assert await _next(ana) == polite
        await ana.send_message(request)  # crossed: the same assignment again
        assert await _next(ana) == polite
        offer = {"type": "webrtc_offer", "toUser": "ana", "payload": {"type": "offer", "sdp": "v=0", "ts": 1}}
        await ben.send_message(orjson.dumps(offer).decode())
        assert await _next(ana) == {**offer, "fromUser": "ben"}
        hangup = {"type": "hangup", "toUser": "ana", "payload": {"ts": 2}}
        await ben.send_message(orjson.dumps(hangup).decode())
        assert await _next(ana) == {**hangup, "fromUser": "ben"}
        # The match is over and neither is pooled (a match takes both out of the pool).
        await ana.send_message(request)
        assert (await _next(ana))["type"] == "no_peer_available"
        await ben.send_message(request)
        assert (await _next(ben))["type"] == "no_peer_available"
        await ana.send_message(available)  # pooled as the two leave: leaving takes her out
        await ana.send_message(request)
        assert (await _next(ana))["type"] == "no_peer_available"


async def test_match_floor_matches_and_relays_as_aleatoria_does() -> None:
    async with trio.open_nursery() as nursery:
        await check_match_floor(await start_floor(nursery, "match_floor.py"))
        nursery.cancel_scope.cancel()
