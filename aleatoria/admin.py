"""The operator API under ``/admin`` (PROTOCOL.md section 13), on the server's own port.

Off unless ``ALEATORIA_ADMIN_TOKEN`` is set: then every ``/admin`` path is 404, as if it did
not exist. With it, each request needs ``Authorization: Bearer <token>`` (compared in
constant time; anything else is 401). JSON in and out; a body is at most ``MAX_BODY``
bytes (413), read within the handshake timeout; bad JSON or fields are 400 with the reason.

Routes (docs/moderation.md has curl examples):
- ``GET /admin/reports?limit=&after=&user=``: newest first, with their evidence;
- ``POST /admin/bans`` ``{user, duration?, reason?, shadow?}``; ``GET /admin/bans``;
  ``DELETE /admin/bans/{user}``;
- ``GET /admin/users/{user}``; ``POST /admin/kick`` ``{user}``.
"""

from __future__ import annotations

import hmac
import logging
import socket
import time
from typing import Any

import orjson
import trio

from aleatoria.http import BodyTooLarge, Request, read_body, send_http
from aleatoria.limits import clamp_limit, id_problem
from aleatoria.moderation import Moderation
from aleatoria.safety import report_sort_key

log = logging.getLogger("aleatoria.admin")

PREFIX = "/admin"
MAX_BODY = 16 * 1024
MAX_REASON_CHARS = 500
MAX_DURATION = 100 * 365 * 86400.0
_JSON = "application/json"


class _Refused(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


async def answer(
    sock: socket.socket,
    request: Request,
    moderation: Moderation,
    *,
    token: str | None,
    body_timeout: float,
) -> None:
    """Answer one ``/admin`` request. Raises OSError if the peer is gone."""
    method = request.method
    if not token:
        await send_http(sock, 404, "Not found\n", method=method)
        return
    try:
        if not _authorized(request, token):
            raise _Refused(401, "a valid Authorization: Bearer token is required")
        body = b""
        if request.method in ("POST", "PUT", "PATCH"):
            read = None
            with trio.move_on_after(body_timeout):
                read = await read_body(sock, request, MAX_BODY)
            if read is None:
                raise _Refused(400, "the request body did not arrive whole")
            body = read
        status, result = await _route(request, body, moderation)
    except BodyTooLarge:
        status, result = 413, {"error": f"the body is larger than {MAX_BODY} bytes"}
    except _Refused as refused:
        status, result = refused.status, {"error": refused.error}
    headers = [("www-authenticate", 'Bearer realm="aleatoria-admin"')] if status == 401 else None
    if status >= 400:
        log.info(
            "event=admin_refused method=%s path=%r status=%d", request.method, request.path[:100], status
        )
    data = orjson.dumps(result)
    await send_http(sock, status, data, content_type=_JSON, method=method, extra_headers=headers)


def _authorized(request: Request, token: str) -> bool:
    given = request.header(b"authorization") or ""
    scheme, _, value = given.partition(" ")
    # compare_digest on bytes: constant time whatever the characters sent.
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


async def _route(request: Request, body: bytes, moderation: Moderation) -> tuple[int, Any]:
    parts = request.path[len(PREFIX) :].strip("/").split("/")
    method = request.method
    match parts:
        case ["reports"]:
            _allow(method, "GET")
            return 200, {"reports": await _reports(request, moderation)}
        case ["bans"]:
            if method == "POST":
                return 201, {"ban": (await _ban(_json(body), moderation)).to_json()}
            _allow(method, "GET", "POST")
            return 200, {"bans": [ban.to_json() for ban in await moderation.safety.bans(time.time())]}
        case ["bans", user]:
            _allow(method, "DELETE")
            found = await moderation.unban(_user(user))
            if not found:
                raise _Refused(404, f"{user} is not banned")
            return 200, {"unbanned": user}
        case ["users", user]:
            _allow(method, "GET")
            return 200, await moderation.user_state(_user(user))
        case ["kick"]:
            _allow(method, "POST")
            user = _user(_field(_json(body), "user", str, required=True))
            moderation.kick(user)
            return 200, {"kicked": user}
    raise _Refused(404, f"no such admin route: {request.path[:100]}")


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise _Refused(405, f"method {method} is not allowed here (use {', '.join(allowed)})")


async def _reports(request: Request, moderation: Moderation) -> list[dict[str, Any]]:
    limit_text = request.param("limit")
    limit = None
    if limit_text is not None:
        # ASCII digits, and few: str.isdigit also takes "²", and int() refuses over 4,300
        # digits; either once dropped the request with a traceback instead of this 400.
        if not (limit_text.isascii() and limit_text.isdigit() and len(limit_text) <= 9):
            raise _Refused(400, "limit must be a whole number")
        limit = int(limit_text)
    after = request.param("after")
    if after is not None and report_sort_key(after) == (0, 0):
        raise _Refused(400, "after must be a report id (as in a report's id field)")
    user = request.param("user")
    if user is not None:
        _user(user)
    return await moderation.safety.reports(clamp_limit(limit), after, user)


async def _ban(data: dict[str, Any], moderation: Moderation) -> Any:
    user = _user(_field(data, "user", str, required=True))
    duration = _field(data, "duration", (int, float))
    if duration is not None and (isinstance(duration, bool) or not 1 <= duration <= MAX_DURATION):
        raise _Refused(400, f"duration must be a number of seconds, 1 to {int(MAX_DURATION)}")
    reason = _field(data, "reason", str) or ""
    if len(reason) > MAX_REASON_CHARS:
        raise _Refused(400, f"reason must be at most {MAX_REASON_CHARS} characters")
    shadow = _field(data, "shadow", bool) or False
    return await moderation.ban(
        user, duration=None if duration is None else float(duration), reason=reason, shadow=shadow
    )


def _json(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _Refused(400, f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _Refused(400, "the body must be a JSON object")
    return data


def _field(data: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = False) -> Any:
    value = data.get(name)
    if value is None:
        if required:
            raise _Refused(400, f"{name} is required")
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise _Refused(400, f"{name} has the wrong type")
    return value


def _user(user: str) -> str:
    problem = id_problem(user)
    if problem is not None:
        raise _Refused(400, f"user {problem}")
    return user
