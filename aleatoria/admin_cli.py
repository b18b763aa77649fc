"""``aleatoria admin ...``: the operator API (``aleatoria.admin``, PROTOCOL.md section 13) on
the command line.

How this works. Each sub-command is one HTTP request to a running server (``--url``, default
``http://127.0.0.1:8085``) with ``Authorization: Bearer <token>`` (``--token`` or
``ALEATORIA_ADMIN_TOKEN``). The answer is shown as a table (rich), or with ``--json`` as the
API's JSON, unchanged. Anything that goes wrong — no server, a refused token, an unknown
user, a bad value — is one line on stderr and exit status 1; a mistake on the command line
itself (no token, a bad duration or user id) is exit status 2, as argparse's own.

docs/moderation.md shows every command next to the curl request it makes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table
from rich.text import Text

from aleatoria.auth import parse_duration
from aleatoria.limits import MAX_LIMIT, id_problem

DEFAULT_URL = "http://127.0.0.1:8085"
TOKEN_ENV = "ALEATORIA_ADMIN_TOKEN"
TIMEOUT = 10.0
# How much of a report's details a table shows (--json has all of it).
DETAILS_SHOWN = 60


class _Failed(Exception):
    """One line for stderr; the command exits with ``status``."""

    def __init__(self, line: str, status: int = 1) -> None:
        super().__init__(line)
        self.line = line
        self.status = status


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``admin`` and its sub-commands to ``aleatoria``'s sub-parsers; the ``admin`` parser."""
    # --url, --token and --json are accepted before or after the sub-command
    # (``admin --json bans`` and ``admin bans --json``); SUPPRESS keeps a later parser's
    # default from overwriting a value given earlier.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=argparse.SUPPRESS, help=f"the server's base URL (default {DEFAULT_URL})"
    )
    common.add_argument("--token", default=argparse.SUPPRESS, help=f"the operator token [env {TOKEN_ENV}]")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON")
    admin = commands.add_parser(
        "admin",
        parents=[common],
        help="moderate a running server (reports, bans, kicks)",
        description="Moderate a running server through its /admin API (docs/moderation.md).",
    )
    actions = admin.add_subparsers(dest="action", required=True, metavar="ACTION")

    reports = actions.add_parser("reports", parents=[common], help="list reports, newest first")
    reports.add_argument("--limit", type=int, default=None, help=f"how many (1-{MAX_LIMIT}, default 50)")
    reports.add_argument("--after", default=None, metavar="REPORT_ID", help="older than this report")
    reports.add_argument("--user", default=None, help="only reports about this user")

    ban = actions.add_parser("ban", parents=[common], help="ban a user (closes its connection)")
    ban.add_argument("user")
    ban.add_argument("--duration", default=None, help="seconds, or e.g. 10m, 2h, 7d (default: permanent)")
    ban.add_argument("--reason", default=None, help="why (kept with the ban)")
    ban.add_argument(
        "--shadow", action="store_true", help="shadow ban: stays connected, reaches only shadow-banned users"
    )

    unban = actions.add_parser("unban", parents=[common], help="end a user's ban")
    unban.add_argument("user")
    actions.add_parser("bans", parents=[common], help="list the active bans")
    kick = actions.add_parser("kick", parents=[common], help="close a user's connection (no ban)")
    kick.add_argument("user")
    user = actions.add_parser("user", parents=[common], help="one user: online, rooms, match, ban, reports")
    user.add_argument("user")
    return admin


def run(args: argparse.Namespace) -> int:
    """Run ``aleatoria admin`` with parsed ``args``; the exit status."""
    try:
        method, path, body = _request_of(args)
        token = getattr(args, "token", None) or os.environ.get(TOKEN_ENV) or ""
        if not token:
            raise _Failed(f"aleatoria admin: needs --token or {TOKEN_ENV}", 2)
        if not token.isascii():  # httpx refuses it in a header (a traceback); no server takes one
            raise _Failed("aleatoria admin: the token must be ASCII (it is sent in an HTTP header)", 2)
        url = (getattr(args, "url", None) or DEFAULT_URL).rstrip("/")
        result = _call(method, url, path, token, body)
    except _Failed as failed:
        print(failed.line, file=sys.stderr)
        return failed.status
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        _show(args, result, Console(highlight=False, soft_wrap=False))
    return 0


def _request_of(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    """The HTTP method, path (with query) and JSON body of ``args``' action."""
    action: str = args.action
    if action == "reports":
        query = {
            name: value
            for name, value in (("limit", args.limit), ("after", args.after), ("user", args.user))
            if value is not None
        }
        if args.user is not None:
            _check_user(args.user)
        if args.limit is not None and not 1 <= args.limit <= MAX_LIMIT:
            # The API clamps it: 0 or 500 listed 1 or 200 reports without a word.
            raise _Failed(f"aleatoria admin: --limit must be 1..{MAX_LIMIT}, got {args.limit}", 2)
        return "GET", "/admin/reports" + (f"?{httpx.QueryParams(query)}" if query else ""), None
    if action == "bans":
        return "GET", "/admin/bans", None
    user = _check_user(args.user)
    if action == "ban":
        body: dict[str, Any] = {"user": user}
        if args.duration is not None:
            try:
                body["duration"] = parse_duration(args.duration)
            except ValueError as exc:
                raise _Failed(f"aleatoria admin: --duration: {exc}", 2) from None
        if args.reason is not None:
            body["reason"] = args.reason
        if args.shadow:
            body["shadow"] = True
        return "POST", "/admin/bans", body
    if action == "unban":
        return "DELETE", f"/admin/bans/{user}", None
    if action == "kick":
        return "POST", "/admin/kick", {"user": user}
    if action == "user":
        return "GET", f"/admin/users/{user}", None
    raise _Failed(f"aleatoria admin: unknown action {action}", 2)  # pragma: no cover - argparse


def _check_user(user: str) -> str:
    problem = id_problem(user)
    if problem is not None:
        raise _Failed(f"aleatoria admin: user {problem}", 2)
    return user


def _call(method: str, url: str, path: str, token: str, body: dict[str, Any] | None) -> Any:
    """One request; its JSON. Raises _Failed with a one-line reason for anything else."""
    headers = {"authorization": f"Bearer {token}", "accept": "application/json"}
    try:
        with httpx.Client(timeout=TIMEOUT) as client:
            response = client.request(method, url + path, headers=headers, json=body)
    except httpx.ConnectError as exc:
        raise _Failed(
            f"aleatoria admin: cannot connect to {url}: {_why(exc)} (is the server running?)"
        ) from None
    except httpx.TimeoutException:
        raise _Failed(f"aleatoria admin: {url} did not answer within {TIMEOUT:g} s") from None
    except httpx.HTTPError as exc:  # a bad URL, a broken response
        raise _Failed(f"aleatoria admin: {method} {url}{path} failed: {_why(exc)}") from None
    try:
        data = response.json()
    except ValueError:
        data = None
    status = response.status_code
    if 200 <= status < 300 and data is not None:
        return data
    error = data.get("error") if isinstance(data, dict) else None
    if status == 401:
        hint = f" (check --token or {TOKEN_ENV})"
    elif status == 404 and error is None:
        hint = " (is ALEATORIA_ADMIN_TOKEN set on the server? without it there is no /admin)"
    else:
        hint = ""
    text = error or response.text.strip()[:200] or response.reason_phrase
    raise _Failed(f"aleatoria admin: {status} {response.reason_phrase}: {text}{hint}")


def _why(exc: Exception) -> str:
    text = str(exc).strip()
    if "refused" in text.lower():
        return "connection refused"
    return text or type(exc).__name__


# -- tables -------------------------------------------------------------------------------


def _show(args: argparse.Namespace, result: Any, console: Console) -> None:
    action: str = args.action
    if action == "reports":
        reports = result["reports"]
        if not reports:
            console.print("No reports.")
        else:
            console.print(_reports_table(reports))
    elif action == "bans":
        bans = result["bans"]
        console.print(_bans_table(bans) if bans else "No active bans.")
    elif action == "ban":
        ban = result["ban"]
        kind = "Shadow-banned" if ban["shadow"] else "Banned"
        reason = f" (reason: {ban['reason']})" if ban["reason"] else ""
        console.print(f"{kind} {ban['user']} {_until(ban['until'])}{reason}.")
    elif action == "unban":
        console.print(f"Unbanned {result['unbanned']}.")
    elif action == "kick":
        console.print(f"Kicked {result['kicked']}: its connection, if any, is closed with 4003.")
    elif action == "user":
        _show_user(result, console)


def _row(table: Table, *cells: str) -> None:
    """Add a row of plain text: what users wrote (a report's details, a ban's reason) is
    never read as rich markup ("[/bold]" once made every listing fail; "[link=...]" could
    hide a URL)."""
    table.add_row(*(Text(cell) for cell in cells))


def _show_user(state: dict[str, Any], console: Console) -> None:
    table = Table(title=f"user {state['user']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    online = "yes" if state["online"] else "no"
    if state["online"] and state.get("instance"):
        online += f" (instance {state['instance']})"
    ban = state.get("ban")
    _row(table, "online", online)
    _row(table, "rooms", ", ".join(state.get("rooms") or []) or "-")
    _row(table, "match", state.get("match") or "-")
    if ban is None:
        _row(table, "ban", "none")
    else:
        kind = "shadow ban" if ban["shadow"] else "ban"
        reason = f" (reason: {ban['reason']})" if ban["reason"] else ""
        _row(table, "ban", f"{kind} {_until(ban['until'])}{reason}")
    _row(table, "reports received", str(state.get("reportsReceived", 0)))
    _row(table, "blocked", ", ".join(state.get("blocked") or []) or "-")
    _row(table, "blocked by", ", ".join(state.get("blockedBy") or []) or "-")
    console.print(table)
    if state.get("reports"):
        console.print(_reports_table(state["reports"], title="latest reports received"))


def _reports_table(reports: list[dict[str, Any]], title: str | None = None) -> Table:
    table = Table(title=title)
    table.add_column("id", no_wrap=True)
    table.add_column("time (UTC)", no_wrap=True)
    for column in ("reporter", "reported", "reason", "details", "evidence"):
        table.add_column(column, overflow="fold")
    for report in reports:
        evidence = report.get("evidence") or {}
        details = str(report.get("details") or "")
        if len(details) > DETAILS_SHOWN:
            details = details[: DETAILS_SHOWN - 1] + "…"
        _row(
            table,
            str(report.get("id", "")),
            _time(report.get("time"), zone=False),
            str(report.get("reporter", "")),
            str(report.get("reported", "")),
            str(report.get("reason", "")),
            details or "-",
            f"{len(evidence.get('directMessages') or [])} DM, {len(evidence.get('roomMessages') or [])} room",
        )
    return table


def _bans_table(bans: list[dict[str, Any]]) -> Table:
    table = Table()
    for column in ("user", "kind", "until"):
        table.add_column(column, no_wrap=True)
    table.add_column("reason", overflow="fold", min_width=10)
    table.add_column("since", no_wrap=True)
    for ban in bans:
        until = ban["until"]
        _row(
            table,
            ban["user"],
            "shadow" if ban["shadow"] else "ban",
            "permanent" if until is None else _time(until),
            ban["reason"] or "-",
            _time(ban["created"]),
        )
    return table


def _until(until: float | None) -> str:
    return "permanently" if until is None else f"until {_time(until)}"


def _time(value: object, *, zone: bool = True) -> str:
    """A report's RFC 3339 time or a ban's unix seconds, as ``YYYY-MM-DD HH:MM:SS UTC``
    (``YYYY-MM-DD HH:MM`` for a column that says it is UTC)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        moment = datetime.datetime.fromtimestamp(value, datetime.UTC)
    elif isinstance(value, str):
        try:
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    else:
        return "-"
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC" if zone else "%Y-%m-%d %H:%M")
