"""``aleatoria admin ...``: the real command, run as a subprocess, against a real server (in
this process, on port 0) with an operator token."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio
from adminapi import TOKEN, admin_json, handshake_status
from rawws import health
from support import Peer, RunningServer, close_of, connect, running_server
from trio_websocket import ConnectionClosed

pytestmark = pytest.mark.loopback  # the CLI runs as a subprocess against a real port


@attrs.frozen
class Run:
    status: int
    out: str
    err: str


async def aleatoria_admin(*args: str, env: dict[str, str] | None = None) -> Run:
    """``python -m aleatoria admin ARGS`` with a wide terminal (so tables do not wrap) and no
    operator token in the environment unless ``env`` gives one."""
    environ = {k: v for k, v in os.environ.items() if k != "ALEATORIA_ADMIN_TOKEN"}
    environ.update({"COLUMNS": "200", **(env or {})})
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-m", "aleatoria", "admin", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=environ,
        )
    return Run(done.returncode, done.stdout.decode(), done.stderr.decode())


@pytest.fixture
async def srv() -> AsyncIterator[RunningServer]:
    async with running_server(admin_token=TOKEN) as running:
        yield running


def opts(srv: RunningServer) -> list[str]:
    return ["--url", srv.http, "--token", TOKEN]


async def closed_with(peer: Peer) -> tuple[int, str]:
    with trio.fail_after(10):
        while True:
            try:
                await peer.recv()
            except ConnectionClosed as exc:
                return close_of(exc)


async def test_ban_bans_user_unban_as_an_operator_would(srv: RunningServer) -> None:
    """``ban`` closes the user's connection (4003) and refuses it (403); ``bans`` and ``user``
    show the ban in tables; ``unban`` lets the user back in."""
    async with connect(srv, "mallory") as mallory:
        run = await aleatoria_admin(
            "ban", "mallory", "--duration", "2h", "--reason", "spam links", *opts(srv)
        )
        assert (0, "") == (run.status, run.err)
        assert run.out.startswith("Banned mallory until ")
        assert "(reason: spam links)" in run.out
        assert (4003, "banned") == await closed_with(mallory)
    assert 403 == (await handshake_status(srv.port, "mallory"))[0]

    bans = await aleatoria_admin("bans", *opts(srv))
    assert 0 == bans.status
    rows = [cells(line) for line in bans.out.splitlines() if line.startswith("│")]
    assert [["mallory", "ban", "spam links"]] == [[row[0], row[1], row[3]] for row in rows]

    user = await aleatoria_admin("user", "mallory", *opts(srv))
    assert 0 == user.status
    assert "user mallory" in user.out
    assert any("online" in line and "no" in line for line in user.out.splitlines())
    assert any("ban " in line and "(reason: spam links)" in line for line in user.out.splitlines())

    unban = await aleatoria_admin("unban", "mallory", *opts(srv))
    assert (0, "Unbanned mallory.\n") == (unban.status, unban.out)
    assert 101 == (await handshake_status(srv.port, "mallory"))[0]
    assert "No active bans." in (await aleatoria_admin("bans", *opts(srv))).out


def cells(line: str) -> list[str]:
    """The cells of one row of a rich table."""
    return [cell.strip() for cell in line.split("│")[1:-1]]


async def test_bans_table_lists_each_kind(srv: RunningServer) -> None:
    """A timed ban, a permanent one and a shadow ban, one row each, newest first."""
    for args in (["alice", "--duration", "600"], ["bob"], ["carol", "--shadow", "--reason", "bot"]):
        assert 0 == (await aleatoria_admin("ban", *args, *opts(srv))).status
    out = (await aleatoria_admin("bans", *opts(srv))).out
    rows = [cells(line) for line in out.splitlines() if line.startswith("│")]
    assert ["carol", "bob", "alice"] == [row[0] for row in rows]
    assert ["shadow", "ban", "ban"] == [row[1] for row in rows]
    assert "permanent" == rows[1][2]
    assert rows[2][2].endswith("UTC")
    assert ["bot", "-", "-"] == [row[3] for row in rows]


async def test_json_prints_the_apis_json(srv: RunningServer) -> None:
    """``--json`` (before or after the action) prints what the API answered, unchanged."""
    ban = await aleatoria_admin("--json", "ban", "mallory", "--duration", "90", *opts(srv))
    assert 0 == ban.status
    printed = json.loads(ban.out)
    assert printed == {"ban": printed["ban"]}
    assert 90 == pytest.approx(printed["ban"]["until"] - printed["ban"]["created"])
    for args in (["--json", "bans"], ["bans", "--json"]):
        listed = await aleatoria_admin(*args, *opts(srv))
        assert await admin_json(srv.port, "GET", "/admin/bans") == json.loads(listed.out)
    state = json.loads((await aleatoria_admin("user", "mallory", "--json", *opts(srv))).out)
    assert await admin_json(srv.port, "GET", "/admin/users/mallory") == state


async def test_reports_table_and_filters(srv: RunningServer) -> None:
    """``reports`` shows reporter, reported, reason, details and the evidence's size;
    ``--user`` and ``--limit`` select; ``user`` lists the reports a user received."""
    assert "No reports." in (await aleatoria_admin("reports", *opts(srv))).out
    async with connect(srv, "alice") as alice, connect(srv, "bob") as bob:
        dm = {"type": "chat_message", "toUser": "alice", "payload": {"content": "hey"}}
        await bob.request(dm, "chat_message")
        await alice.expect("chat_message")
        payload: dict[str, Any] = {"user": "bob", "reason": "harassment", "details": "rude"}
        await alice.request({"type": "report_user", "payload": payload}, "report_received")
        payload = {"user": "alice", "reason": "spam"}
        await bob.request({"type": "report_user", "payload": payload}, "report_received")

    out = (await aleatoria_admin("reports", *opts(srv))).out
    rows = [cells(line) for line in out.splitlines() if line.startswith("│")]
    assert [["bob", "alice", "spam", "-"], ["alice", "bob", "harassment", "rude"]] == [
        row[2:6] for row in rows
    ]
    assert ["1 DM, 0 room"] * 2 == [row[6] for row in rows]  # their DM, both ways
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", row[1]) for row in rows)

    about_bob = (await aleatoria_admin("reports", "--user", "bob", *opts(srv))).out
    assert ["harassment"] == [cells(line)[4] for line in about_bob.splitlines() if line.startswith("│")]
    newest = json.loads((await aleatoria_admin("reports", "--limit", "1", "--json", *opts(srv))).out)
    assert ["spam"] == [report["reason"] for report in newest["reports"]]
    user = (await aleatoria_admin("user", "bob", *opts(srv))).out
    assert "latest reports received" in user
    assert any("reports received" in line and "1" in line for line in user.splitlines())


async def test_what_users_wrote_is_shown_as_text_not_markup(srv: RunningServer) -> None:
    """A report's details are free text from any chat user: rich markup in them is shown as
    written ("[/bold]" once made every listing fail with a traceback, and "[link=...]" could
    hide a URL behind other words)."""
    details = "[/bold] oops [link=https://evil.example/]re-login[/link]"
    async with connect(srv, "alice") as alice:
        payload = {"user": "mallory", "reason": "other", "details": details}
        await alice.request({"type": "report_user", "payload": payload}, "report_received")
    for command in (["reports"], ["user", "mallory"]):
        run = await aleatoria_admin(*command, *opts(srv))
        assert (0, "") == (run.status, run.err), run
        assert details in run.out, run.out


async def test_kick_closes_with_4003_without_a_ban(srv: RunningServer) -> None:
    async with connect(srv, "mallory") as mallory:
        run = await aleatoria_admin("kick", "mallory", *opts(srv))
        assert (0, "") == (run.status, run.err)
        assert run.out.startswith("Kicked mallory")
        assert (4003, "banned") == await closed_with(mallory)
    assert 101 == (await handshake_status(srv.port, "mallory"))[0]


async def test_the_token_may_come_from_the_environment(srv: RunningServer) -> None:
    run = await aleatoria_admin("bans", "--url", srv.http, env={"ALEATORIA_ADMIN_TOKEN": TOKEN})
    assert (0, "No active bans.\n") == (run.status, run.out)


async def test_errors_are_one_line_and_exit_1(srv: RunningServer) -> None:
    """401, 404, 400 and a server that is not there: one line on stderr, exit status 1."""
    wrong = await aleatoria_admin("bans", "--url", srv.http, "--token", "nope")
    assert (1, "") == (wrong.status, wrong.out)
    assert wrong.err == (
        "aleatoria admin: 401 Unauthorized: a valid Authorization: Bearer token is required"
        " (check --token or ALEATORIA_ADMIN_TOKEN)\n"
    )
    missing = await aleatoria_admin("unban", "nobody", *opts(srv))
    assert (1, "aleatoria admin: 404 Not Found: nobody is not banned\n") == (missing.status, missing.err)
    too_long = await aleatoria_admin("ban", "mallory", "--duration", "40000d", *opts(srv))
    assert 1 == too_long.status
    assert too_long.err.startswith("aleatoria admin: 400 Bad Request: duration must be a number of seconds")
    assert 1 == len(too_long.err.splitlines())

    with trio.socket.socket() as probe:  # a port nobody listens on
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    refused = await aleatoria_admin("bans", "--url", f"http://127.0.0.1:{port}", "--token", TOKEN)
    assert (1, "") == (refused.status, refused.out)
    assert refused.err == (
        f"aleatoria admin: cannot connect to http://127.0.0.1:{port}: connection refused"
        " (is the server running?)\n"
    )
    assert "ok" == (await health(srv.port))["status"]


async def test_a_server_without_the_api_says_so(server: RunningServer) -> None:
    """Against a server without ALEATORIA_ADMIN_TOKEN the 404 comes with a hint."""
    run = await aleatoria_admin("bans", "--url", server.http, "--token", TOKEN)
    assert 1 == run.status
    assert "404 Not Found" in run.err
    assert "is ALEATORIA_ADMIN_TOKEN set on the server?" in run.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bans"], "aleatoria admin: needs --token or ALEATORIA_ADMIN_TOKEN"),
        (["ban", "bad user", "--token", "t"], "aleatoria admin: user must be"),
        (
            ["ban", "mallory", "--duration", "5y", "--token", "t"],
            "aleatoria admin: --duration: not a duration",
        ),
        (["user", "x" * 65, "--token", "t"], "aleatoria admin: user is longer than 64"),
        # The API clamps a limit: these listed 1 and 200 reports without a word.
        (["reports", "--limit", "0", "--token", "t"], "aleatoria admin: --limit must be 1..200, got 0"),
        (["reports", "--limit", "500", "--token", "t"], "aleatoria admin: --limit must be 1..200, got 500"),
        # A UnicodeEncodeError traceback from httpx.
        (["bans", "--token", "t\u00f6ken"], "aleatoria admin: the token must be ASCII"),
    ],
)
async def test_command_line_mistakes_exit_2_before_any_request(args: list[str], message: str) -> None:
    """No token, a bad user id or duration: exit status 2, nothing sent (no server is
    needed to find out)."""
    run = await aleatoria_admin(*args, "--url", "http://127.0.0.1:9")
    assert 2 == run.status
    assert run.err.startswith(message), run.err
