#!/usr/bin/env python3
"""Server memory per idle connection at level 1 and level 2, and per kept session (a level-2
connection dropped without a close frame, kept for resume: PROTOCOL.md section 15).

Starts ``aleatoria serve`` (memory store) as a subprocess, opens N raw WebSocket connections
of each kind, and reads the server's RSS from /proc after each step:

    python scripts/level2_memory.py --n 2000
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import socket
import subprocess
import sys
import tempfile
import time


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def open_ws(port: int, user: str, level2: bool) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    query = f"userId={user}" + ("&v=2" if level2 else "")
    sock.sendall(
        f"GET /ws?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    data = b""
    while b"room_joined" not in data:  # the 101, then (level 2: welcome and) room_joined
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("closed during the handshake")
        data += chunk
    return sock


def settle(pid: int) -> int:
    time.sleep(1.0)  # let the server finish what the last connections started, then read
    return rss_bytes(pid)


def _text(path: str) -> str:
    with open(path) as file:
        return file.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    if args.n < 1:
        parser.error("--n must be at least 1")
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:  # a pipe would fill and block it
        server = subprocess.Popen(
            [sys.executable, "-m", "aleatoria", "serve", "--port", "0", "--log-level", "info",
             "--max-connections-per-ip", "0", "--rate-limit", "0", "--resume-window", "600"],
            stderr=log, text=True,
        )  # fmt: skip
        port = 0
        deadline = time.monotonic() + 30
        while not port and time.monotonic() < deadline:
            time.sleep(0.1)
            found = re.search(r"listening on ws://127\.0\.0\.1:(\d+)/ws", _text(log.name))
            if found:
                port = int(found.group(1))
        if not port:
            server.kill()
            raise SystemExit("the server did not start: " + _text(log.name)[-2000:])
        try:
            measure(server.pid, port, args.n)
        finally:
            server.terminate()  # a graceful stop: up to ALEATORIA_SHUTDOWN_TIMEOUT (10 s)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def measure(pid: int, port: int, n: int) -> None:
    base = settle(pid)
    level1 = [open_ws(port, f"one{i}", False) for i in range(n)]
    after1 = settle(pid)
    level2 = [open_ws(port, f"two{i}", True) for i in range(n)]
    after2 = settle(pid)
    for sock in level2:  # dropped without a close frame (a TCP reset): kept for resume
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    kept = settle(pid)
    print(f"level 1: {(after1 - base) / n:,.0f} bytes per idle connection")
    print(f"level 2: {(after2 - after1) / n:,.0f} bytes per idle connection")
    print(f"kept session (level 2 after the drop): {(kept - after1) / n:,.0f} bytes each")
    for sock in level1:
        sock.close()


if __name__ == "__main__":
    main()
