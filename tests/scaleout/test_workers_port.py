"""One ``--workers`` deployment per port: a second one started on a port another deployment
holds (the kernel would let it share the port through SO_REUSEPORT and split the traffic)
is refused with one ``event=start_failed`` line and exit status 1, as a real process."""

from __future__ import annotations

import os
import subprocess
import sys

import trio
from redis_server import RedisServer
from scaleout_support import serve_process
from support import connect


def _environment() -> dict[str, str]:
    """This environment without settings of the server (a developer's shell may set some)."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("ALEATORIA_", "VALKEY_", "REDIS_", "MESSAGE_TTL"))
    }


async def test_a_second_deployment_on_a_held_port_is_refused(redis_server: RedisServer) -> None:
    """``serve --workers 2`` on the port of a running ``--workers 2``: exit 1, one
    start_failed line naming the port and the holder's pid, no worker started; also when it
    asks for another address on the same port (0.0.0.0); the first deployment keeps serving
    alone and stops with exit 0."""
    url = redis_server.url
    async with serve_process("--redis-url", url, "--workers", "2") as first:
        for host in ("127.0.0.1", "0.0.0.0"):
            command = [sys.executable, "-m", "aleatoria", "serve", "--workers", "2", "--redis-url", url]
            command += ["--host", host, "--port", str(first.port)]
            with trio.fail_after(20):
                second = await trio.run_process(
                    command,
                    stdin=subprocess.DEVNULL,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env=_environment(),
                )
            err = second.stderr.decode(errors="replace")
            assert 1 == second.returncode, err
            failed = [line for line in err.splitlines() if "event=start_failed" in line]
            assert 1 == len(failed), err
            assert "reason=port_in_use" in failed[0]
            expected = (
                f"port {first.port} is held by another aleatoria --workers deployment "
                f"(pid {first.process.pid})"
            )
            assert expected in failed[0]
            assert "worker_started" not in err
            assert "Traceback" not in err
        async with connect(first.port, "alice", skip=True) as alice:
            await alice.sync()
