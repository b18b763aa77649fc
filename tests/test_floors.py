"""The speed floors in scripts/ are instruments: each must do the work it claims to measure."""

from __future__ import annotations

import subprocess
import sys
from functools import partial
from pathlib import Path

import orjson
import pytest
import trio
from trio_websocket import open_websocket_url

pytestmark = pytest.mark.loopback  # a real process and real sockets

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


async def test_dm_floor_relays_a_dm_and_the_senders_copy() -> None:
    """dm_floor.py sends each text frame to its ``toUser`` and back to its sender, byte for
    byte (the reference generator's ``dm`` reads ``content`` from both), medium frames too."""
    async with trio.open_nursery() as nursery:
        command = [sys.executable, str(SCRIPTS / "dm_floor.py"), "--port", "0"]
        process = await nursery.start(partial(trio.run_process, command, stdout=subprocess.PIPE, check=False))
        assert process.stdout is not None
        with trio.fail_after(10):
            line = b""
            while not line.endswith(b"\n"):
                line += await process.stdout.receive_some(1)
        port = int(line.rsplit(b":", 1)[1])
        base = f"ws://127.0.0.1:{port}/ws"
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
