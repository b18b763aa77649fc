"""TURN credentials against a real coturn (PROTOCOL.md section 14, docs/turn.md): what a real
server hands out over a real WebSocket lets coturn's own client, ``turnutils_uclient``,
allocate relay addresses and send data through them; expired, wrongly signed or altered
credentials are refused. coturn runs as tests/turn_server.py starts it."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from support import connect, running_server
from turn_server import TurnServer, started, turnserver_binary, uclient_binary

from aleatoria.ice import turn_credential, turn_username

pytestmark = pytest.mark.loopback  # a real coturn

__all__ = ["turnserver_binary", "uclient_binary"]  # fixtures, used by name

# uclient takes about six seconds for a successful exchange (its own pacing), a refusal none.
UCLIENT_SECONDS = 40.0


@pytest.fixture
def coturn(turnserver_binary: str, tmp_path: Path) -> Any:
    """coturn knowing two secrets: the current one and the one being rotated out."""
    with started(turnserver_binary, tmp_path, ("current-s3cret", "previous-s3cret")) as server:
        yield server


async def allocate(uclient: str, turn: TurnServer, username: str, credential: str) -> tuple[bool, str]:
    """Two clients allocate relay addresses with these credentials and send each other a
    message through them (``-y``). (accepted, uclient's output)."""
    args = [uclient, "-y", "-c", "-n", "1", "-m", "2", "-X", "-u", username, "-w", credential]
    args += ["-p", str(turn.port), "127.0.0.1"]
    with trio.fail_after(UCLIENT_SECONDS):
        done = await trio.run_process(args, capture_stdout=True, stderr=subprocess.STDOUT, check=False)
    output = done.stdout.decode(errors="replace")
    received = [int(n) for n in re.findall(r"tot_recv_msgs=(\d+)", output)]
    accepted = 0 == done.returncode and bool(received) and received[-1] > 0
    return accepted, output


def turn_entry(ice_servers: list[dict[str, Any]]) -> dict[str, Any]:
    (entry,) = [server for server in ice_servers if server["urls"][0].startswith("turn:")]
    return entry


async def test_credentials_from_the_server_are_accepted_by_coturn(
    coturn: TurnServer, uclient_binary: str
) -> None:
    """get_ice_servers' and assign_role's credentials allocate on coturn; so do those of an
    instance still signing with the previous secret (rotation, docs/turn.md)."""
    ice = {"ice_urls": (coturn.url,), "turn_ttl": 300}
    async with (
        running_server(**ice, turn_secret=("current-s3cret", "previous-s3cret")) as server,
        running_server(**ice, turn_secret=("previous-s3cret",)) as not_rotated,
        connect(server, "alice") as alice,
        connect(server, "bob") as bob,
        connect(not_rotated, "carol") as carol,
    ):
        issued = [
            turn_entry(
                (await alice.request({"type": "get_ice_servers"}, "ice_servers"))["payload"]["iceServers"]
            )
        ]
        await bob.send({"type": "user_available_webrtc"})
        await alice.send({"type": "request_random_peer"})
        await alice.expect("assign_role")
        issued.append(turn_entry((await bob.expect("assign_role"))["payload"]["iceServers"]))
        issued.append(
            turn_entry(
                (await carol.request({"type": "get_ice_servers"}, "ice_servers"))["payload"]["iceServers"]
            )
        )
        assert [coturn.url] * 3 == [entry["urls"][0] for entry in issued]
        assert ["alice", "bob", "carol"] == [entry["username"].split(":")[1] for entry in issued]
        expiry = int(issued[0]["username"].split(":")[0])
        assert abs(time.time() + 300 - expiry) < 30

        results: dict[str, tuple[bool, str]] = {}

        async def check(entry: dict[str, Any]) -> None:
            results[entry["username"]] = await allocate(
                uclient_binary, coturn, entry["username"], entry["credential"]
            )

        async with trio.open_nursery() as nursery:
            for entry in issued:
                nursery.start_soon(check, entry)
        for entry in issued:
            accepted, output = results[entry["username"]]
            assert accepted, output
            assert coturn.allocations(entry["username"]), "\n".join(coturn.lines[-30:])


async def test_expired_wrongly_signed_or_altered_credentials_are_refused(
    coturn: TurnServer, uclient_binary: str
) -> None:
    """coturn refuses a username whose expiry has passed, a credential signed with a secret it
    does not know, and a username altered after signing (another user, a later expiry)."""
    now = int(time.time())
    expired = turn_username("alice", now - 120, 60)
    valid = turn_username("alice", now, 300)
    forged_user = valid.replace(":alice", ":mallory")
    later = turn_username("alice", now, 86_400)
    cases = {
        "expired": (expired, turn_credential("current-s3cret", expired)),
        "unknown secret": (valid, turn_credential("some-other-s3cret", valid)),
        "other user": (forged_user, turn_credential("current-s3cret", valid)),
        "later expiry": (later, turn_credential("current-s3cret", valid)),
    }
    for name, (username, credential) in cases.items():
        accepted, output = await allocate(uclient_binary, coturn, username, credential)
        assert not accepted, (name, output)
        assert "Cannot complete Allocation" in output, (name, output)
        assert [] == coturn.allocations(username), name
