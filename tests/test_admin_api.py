"""The operator API under /admin (PROTOCOL.md section 13) against a real server over real TCP:
off without a token, the Bearer check, every route's JSON, the 4xx answers and their reasons,
bans and kicks as the banned user's socket sees them, and hostile requests."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from adminapi import (
    TOKEN,
    admin,
    admin_json,
    admin_request,
    handshake_status,
    wait_for_handshake,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inmemory import InMemoryServer, inmemory_server
from rawws import Response, health, open_tcp, parse_response
from support import Peer, Target, close_of, connect
from trio_websocket import ConnectionClosed

BAN_KEYS = {"user", "until", "reason", "shadow", "created"}
USER_KEYS = {
    "user", "online", "instance", "rooms", "match", "reportsReceived", "reports", "ban", "blocked",
    "blockedBy",
}  # fmt: skip
REPORT_KEYS = {"id", "reporter", "reported", "reason", "details", "time", "match", "instance", "evidence"}
ROUTES = [
    ("GET", "/admin/reports"),
    ("GET", "/admin/bans"),
    ("POST", "/admin/bans"),
    ("DELETE", "/admin/bans/mallory"),
    ("GET", "/admin/users/mallory"),
    ("POST", "/admin/kick"),
]


@pytest.fixture
async def srv() -> AsyncIterator[InMemoryServer]:
    async with inmemory_server(admin_token=TOKEN) as running:
        yield running


async def closed_with(peer: Peer) -> tuple[int, str]:
    """Read until the server closes ``peer``; the close code and reason."""
    with trio.fail_after(10):
        while True:
            try:
                await peer.recv()
            except ConnectionClosed as exc:
                return close_of(exc)


async def report(peer: Peer, user: str, reason: str = "spam", details: str | None = None) -> str:
    payload: dict[str, Any] = {"user": user, "reason": reason}
    if details is not None:
        payload["details"] = details
    reply = await peer.request({"type": "report_user", "payload": payload}, "report_received")
    report_id: str = reply["payload"]["reportId"]
    return report_id


# -- off, and the token -----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/admin", "/admin/", "/admin/nope", *(path for _, path in ROUTES)])
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
async def test_every_admin_path_is_404_without_the_setting(
    server: InMemoryServer, method: str, path: str
) -> None:
    """Without ALEATORIA_ADMIN_TOKEN every /admin path is 404, with or without a token."""
    for token in (None, TOKEN, ""):
        response = await admin(server, method, path, token=token, body={"user": "mallory"})
        assert 404 == response.status, (method, path, token, response)


@pytest.mark.parametrize(
    "authorization",
    [
        None,  # no header at all
        "Bearer wrong-token",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Basic {TOKEN}",
        f"Token {TOKEN}",
        TOKEN,
        "Bearer",
        "Bearer ",
        "",
        f"Bearer {TOKEN.upper()}",
        "Bearer " + "é" * 20,
    ],
)
async def test_a_missing_or_wrong_token_is_401(srv: InMemoryServer, authorization: str | None) -> None:
    """Anything but ``Bearer <the token>`` is 401 on every route, with a JSON reason and a
    WWW-Authenticate challenge; nothing is done (no ban appears)."""
    for method, path in ROUTES:
        response = await admin(
            srv,
            method,
            path,
            token=None,
            authorization=authorization,
            body={"user": "mallory"} if method == "POST" else None,
        )
        assert 401 == response.status, (method, path, response)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "Bearer token" in json.loads(response.body)["error"]
    assert {"bans": []} == await admin_json(srv, "GET", "/admin/bans")


async def test_the_token_in_the_query_is_not_enough(srv: InMemoryServer) -> None:
    """The token must come in the Authorization header (not a query string, not a cookie)."""
    for path in (f"/admin/bans?token={TOKEN}", f"/admin/bans?access_token={TOKEN}"):
        assert 401 == (await admin(srv, "GET", path, token=None)).status
    cookie = {"Cookie": f"token={TOKEN}"}
    assert 401 == (await admin(srv, "GET", "/admin/bans", token=None, headers=cookie)).status


async def test_the_scheme_is_case_insensitive(srv: InMemoryServer) -> None:
    """``bearer`` and ``BEARER`` name the same scheme (RFC 9110); the token itself is exact."""
    for scheme in ("bearer", "BEARER", "Bearer"):
        response = await admin(srv, "GET", "/admin/bans", authorization=f"{scheme} {TOKEN}")
        assert 200 == response.status, scheme


# -- each route's happy path ------------------------------------------------------------------


async def test_ban_list_user_unban_shapes(srv: InMemoryServer) -> None:
    """POST /admin/bans answers 201 with the ban; GET /admin/bans lists it; the user's state
    shows it; DELETE ends it (then 404)."""
    assert {"bans": []} == await admin_json(srv, "GET", "/admin/bans")
    before = time.time()
    created = await admin_json(
        srv, "POST", "/admin/bans", 201, body={"user": "mallory", "duration": 60, "reason": "spam links"}
    )
    ban = created["ban"]
    assert BAN_KEYS == set(ban)
    assert ("mallory", "spam links", False) == (ban["user"], ban["reason"], ban["shadow"])
    assert before <= ban["created"] <= time.time()
    assert 60 == pytest.approx(ban["until"] - ban["created"])

    permanent = await admin_json(srv, "POST", "/admin/bans", 201, body={"user": "trudy", "shadow": True})
    assert {"user": "trudy", "until": None, "reason": "", "shadow": True} == {
        key: permanent["ban"][key] for key in ("user", "until", "reason", "shadow")
    }
    listed = await admin_json(srv, "GET", "/admin/bans")
    assert ["trudy", "mallory"] == [ban["user"] for ban in listed["bans"]]  # newest first
    assert ban == listed["bans"][1]

    state = await admin_json(srv, "GET", "/admin/users/mallory")
    assert USER_KEYS == set(state)
    assert {
        "user": "mallory",
        "online": False,
        "instance": None,
        "rooms": [],
        "match": None,
        "reportsReceived": 0,
        "reports": [],
        "ban": ban,
        "blocked": [],
        "blockedBy": [],
    } == state

    assert {"unbanned": "mallory"} == await admin_json(srv, "DELETE", "/admin/bans/mallory")
    gone = await admin_json(srv, "DELETE", "/admin/bans/mallory", 404)
    assert {"error": "mallory is not banned"} == gone
    assert ["trudy"] == [ban["user"] for ban in (await admin_json(srv, "GET", "/admin/bans"))["bans"]]
    assert (await admin_json(srv, "GET", "/admin/users/mallory"))["ban"] is None


async def test_a_new_ban_replaces_the_old(srv: InMemoryServer) -> None:
    """Banning a banned user replaces its ban (one entry per user)."""
    await admin_json(srv, "POST", "/admin/bans", 201, body={"user": "mallory", "duration": 60})
    await admin_json(srv, "POST", "/admin/bans", 201, body={"user": "mallory", "reason": "for good"})
    bans = (await admin_json(srv, "GET", "/admin/bans"))["bans"]
    assert [("mallory", None, "for good")] == [(b["user"], b["until"], b["reason"]) for b in bans]


async def test_reports_newest_first_with_evidence_and_paging(srv: InMemoryServer) -> None:
    """GET /admin/reports: newest first, each with its evidence; ``limit``, ``after`` (older
    than that report) and ``user`` select."""
    assert {"reports": []} == await admin_json(srv, "GET", "/admin/reports")
    async with (
        connect(srv, "mallory") as mallory,
        connect(srv, "alice") as alice,
        connect(srv, "bob") as bob,
    ):
        await mallory.request(
            {"type": "chat_message", "room": "Lobby", "payload": {"content": "buy"}}, "chat_message"
        )
        dm = {"type": "chat_message", "toUser": "alice", "payload": {"content": "psst"}}
        await mallory.request(dm, "chat_message")
        await alice.expect("chat_message")  # the room message
        await alice.expect("chat_message")  # the DM
        await bob.expect("chat_message")  # the room message
        first = await report(alice, "mallory", "spam", "sells things")
        second = await report(bob, "mallory", "harassment")
        third = await report(alice, "bob", "other")

    reports = (await admin_json(srv, "GET", "/admin/reports"))["reports"]
    assert [third, second, first] == [r["id"] for r in reports]
    oldest = reports[2]
    assert REPORT_KEYS == set(oldest)
    assert ("alice", "mallory", "spam", "sells things") == (
        oldest["reporter"],
        oldest["reported"],
        oldest["reason"],
        oldest["details"],
    )
    assert ["psst"] == [m["payload"]["content"] for m in oldest["evidence"]["directMessages"]]
    assert ["buy"] == [m["payload"]["content"] for m in oldest["evidence"]["roomMessages"]]
    assert {"matchId": None, "peer": "mallory", "current": False} == oldest["match"]
    assert (await health(srv))["instance"] == oldest["instance"]

    page = (await admin_json(srv, "GET", "/admin/reports?limit=2"))["reports"]
    assert [third, second] == [r["id"] for r in page]
    rest = (await admin_json(srv, "GET", f"/admin/reports?limit=2&after={second}"))["reports"]
    assert [first] == [r["id"] for r in rest]
    about = (await admin_json(srv, "GET", "/admin/reports?user=mallory"))["reports"]
    assert [second, first] == [r["id"] for r in about]
    state = await admin_json(srv, "GET", "/admin/users/mallory")
    assert (2, [second, first]) == (state["reportsReceived"], [r["id"] for r in state["reports"]])
    assert ["alice", "bob"] == state["blockedBy"]  # a report also blocks


async def test_user_state_shows_online_rooms_match_and_shadow_ban(srv: InMemoryServer) -> None:
    """GET /admin/users/{user}: online, its instance, rooms, live match; a shadow ban shows
    and leaves the user connected."""
    async with connect(srv, "alice") as alice, connect(srv, "bob") as bob:
        await alice.request({"type": "join_room", "room": "garden"}, "room_joined")
        await bob.send({"type": "user_available_webrtc"})
        await bob.request({"type": "ping"}, "pong")  # the pool entry is in
        await alice.request({"type": "request_random_peer", "payload": {}}, "assign_role")
        await bob.expect("assign_role")
        state = await admin_json(srv, "GET", "/admin/users/alice")
        instance = (await health(srv))["instance"]
        assert (True, instance, ["Lobby", "garden"], "bob", None) == (
            state["online"],
            state["instance"],
            state["rooms"],
            state["match"],
            state["ban"],
        )
        await admin_json(srv, "POST", "/admin/bans", 201, body={"user": "alice", "shadow": True})
        state = await admin_json(srv, "GET", "/admin/users/alice")
        assert (True, True) == (state["online"], state["ban"]["shadow"])
        await alice.request({"type": "ping"}, "pong")  # still connected


# -- bans and kicks as the user sees them ------------------------------------------------------


async def test_a_ban_closes_the_connection_with_4003_and_refuses_the_handshake(srv: InMemoryServer) -> None:
    """A ban closes the live connection with 4003 "banned"; a new handshake gets 403 "banned"
    until the ban is lifted; others are unaffected."""
    async with connect(srv, "bystander") as bystander, connect(srv, "mallory") as mallory:
        await admin_json(srv, "POST", "/admin/bans", 201, body={"user": "mallory", "reason": "spam"})
        assert (4003, "banned") == await closed_with(mallory)
        assert (403, b"banned\n") == await handshake_status(srv, "mallory")
        assert not (await admin_json(srv, "GET", "/admin/users/mallory"))["online"]
        await bystander.request({"type": "ping"}, "pong")
    await admin_json(srv, "DELETE", "/admin/bans/mallory")
    async with connect(srv, "mallory") as mallory:
        await mallory.request({"type": "ping"}, "pong")


async def test_a_timed_ban_ends_by_itself(srv: InMemoryServer) -> None:
    """A ban with a duration refuses the handshake until it ends, then lets the user in."""
    await admin_json(srv, "POST", "/admin/bans", 201, body={"user": "mallory", "duration": 1.5})
    assert 403 == (await handshake_status(srv, "mallory"))[0]
    await wait_for_handshake(srv, "mallory", 101)
    assert {"bans": []} == await admin_json(srv, "GET", "/admin/bans")
    assert (await admin_json(srv, "GET", "/admin/users/mallory"))["ban"] is None


async def test_a_kick_closes_with_4003_and_the_user_may_come_back(srv: InMemoryServer) -> None:
    """POST /admin/kick closes the connection with 4003 without a ban: the user reconnects."""
    async with connect(srv, "mallory") as mallory:
        assert {"kicked": "mallory"} == await admin_json(srv, "POST", "/admin/kick", body={"user": "mallory"})
        assert (4003, "banned") == await closed_with(mallory)
    async with connect(srv, "mallory") as mallory:
        await mallory.request({"type": "ping"}, "pong")
    # Kicking a user who is not connected is not an error: nothing to close.
    assert {"kicked": "nobody"} == await admin_json(srv, "POST", "/admin/kick", body={"user": "nobody"})


# -- refusals ---------------------------------------------------------------------------------

BAD_BANS: list[tuple[Any, str]] = [
    ({}, "user is required"),
    ({"user": None}, "user is required"),
    ({"user": 5}, "user has the wrong type"),
    ({"user": ["mallory"]}, "user has the wrong type"),
    ({"user": ""}, "user must not be empty"),
    ({"user": "bad user"}, "user must be"),
    ({"user": "a:b"}, "user must be"),
    ({"user": "x" * 65}, "user is longer than 64"),
    ({"user": "m", "duration": -1}, "duration must be"),
    ({"user": "m", "duration": 0}, "duration must be"),
    ({"user": "m", "duration": 0.5}, "duration must be"),
    ({"user": "m", "duration": 1e12}, "duration must be"),
    ({"user": "m", "duration": 10**30}, "duration must be"),
    ({"user": "m", "duration": "60"}, "duration has the wrong type"),
    ({"user": "m", "duration": True}, "duration has the wrong type"),
    ({"user": "m", "reason": 5}, "reason has the wrong type"),
    ({"user": "m", "reason": "x" * 501}, "reason must be at most 500"),
    ({"user": "m", "shadow": "yes"}, "shadow has the wrong type"),
    ({"user": "m", "shadow": 1}, "shadow has the wrong type"),
    ([], "must be a JSON object"),
    ("mallory", "must be a JSON object"),
    (None, "must be a JSON object"),
]


@pytest.mark.parametrize(("body", "reason"), BAD_BANS)
async def test_a_bad_ban_is_400_with_the_reason(srv: InMemoryServer, body: Any, reason: str) -> None:
    """Bad fields are 400 with a reason naming the field; nothing is banned."""
    answer = await admin_json(srv, "POST", "/admin/bans", 400, raw_body=json.dumps(body).encode())
    assert reason in answer["error"], answer
    assert {"bans": []} == await admin_json(srv, "GET", "/admin/bans")


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b'{"user": "m",}', b"\xff\xfe", b"nul\x00l", b"NaN", b'{"user": "m"} trailing'],
)
async def test_a_body_that_is_not_json_is_400(srv: InMemoryServer, raw: bytes) -> None:
    """A body that is not JSON is 400 "the body is not JSON: ...", on both POST routes."""
    for path in ("/admin/bans", "/admin/kick"):
        answer = await admin_json(srv, "POST", path, 400, raw_body=raw)
        assert answer["error"].startswith("the body is not JSON"), answer


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/admin/users/bad:user", "user must be"),
        ("/admin/users/" + "x" * 65, "user is longer than 64"),
        ("/admin/users/%20x", "user must be"),
        ("/admin/bans/bad:user", "user must be"),
        ("/admin/reports?limit=x", "limit must be a whole number"),
        ("/admin/reports?limit=-1", "limit must be a whole number"),
        ("/admin/reports?limit=%C2%B2", "limit must be a whole number"),  # "²": isdigit, not int
        ("/admin/reports?limit=" + "9" * 5000, "limit must be a whole number"),  # over int()'s digits
        ("/admin/reports?after=zzz", "after must be a report id"),
        ("/admin/reports?user=a:b", "user must be"),
    ],
)
async def test_bad_ids_and_parameters_are_400(srv: InMemoryServer, path: str, reason: str) -> None:
    method = "DELETE" if path.startswith("/admin/bans/") else "GET"
    answer = await admin_json(srv, method, path, 400)
    assert reason in answer["error"], answer


async def test_kick_checks_its_body(srv: InMemoryServer) -> None:
    for body, reason in [
        ({}, "user is required"),
        ({"user": 7}, "wrong type"),
        ({"user": "a b"}, "user must be"),
    ]:
        answer = await admin_json(srv, "POST", "/admin/kick", 400, body=body)
        assert reason in answer["error"], answer


async def test_a_body_over_16_kib_is_413(srv: InMemoryServer) -> None:
    """A body over 16 KiB is 413, whether its length is declared or it is sent chunked."""
    big = json.dumps({"user": "mallory", "reason": "x" * 17_000}).encode()
    answer = await admin_json(srv, "POST", "/admin/bans", 413, raw_body=big)
    assert "larger than 16384 bytes" in answer["error"]
    chunk = b"%x\r\n%s\r\n" % (len(big), big)
    request = admin_request(srv.port, "POST", "/admin/bans", headers={"Transfer-Encoding": "chunked"})
    request = request.replace(b"Content-Length: 0\r\n", b"") + chunk + b"0\r\n\r\n"
    async with open_tcp(srv) as conn:
        await conn.send(request)
        with trio.fail_after(10):
            response = parse_response(await conn.read_to_eof())
    assert 413 == response.status
    assert {"bans": []} == await admin_json(srv, "GET", "/admin/bans")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/admin/reports", "GET"),
        ("DELETE", "/admin/reports", "GET"),
        ("PUT", "/admin/bans", "GET, POST"),
        ("DELETE", "/admin/bans", "GET, POST"),
        ("GET", "/admin/bans/mallory", "DELETE"),
        ("POST", "/admin/bans/mallory", "DELETE"),
        ("DELETE", "/admin/users/mallory", "GET"),
        ("GET", "/admin/kick", "POST"),
        ("PATCH", "/admin/kick", "POST"),
    ],
)
async def test_a_wrong_method_is_405(srv: InMemoryServer, method: str, path: str, allowed: str) -> None:
    answer = await admin_json(srv, method, path, 405, body={"user": "mallory"})
    assert f"use {allowed}" in answer["error"], answer


async def test_an_unknown_admin_route_is_404_json(srv: InMemoryServer) -> None:
    for path in ("/admin", "/admin/", "/admin/nope", "/admin/users", "/admin/users/a/b", "/admin/bans/a/b"):
        answer = await admin_json(srv, "GET", path, 404)
        assert answer["error"].startswith("no such admin route"), (path, answer)


# -- hostile requests ------------------------------------------------------------------------


async def exchange(
    server: Target, data: bytes, *, half_close: bool = False, timeout: float = 10.0
) -> Response:
    """Send ``data`` (then, with ``half_close``, shut our side), read the answer to EOF."""
    async with open_tcp(server) as conn:
        with trio.fail_after(timeout):
            await conn.send(data)
            if half_close:
                await conn.stream.send_eof()
            raw = await conn.read_to_eof()
    return parse_response(raw, method=data.split(b" ", 1)[0].decode("latin-1"))


async def test_truncated_and_mislabelled_bodies_are_answered() -> None:
    """A body shorter than its Content-Length (the client stops or goes quiet) is 400 "did
    not arrive whole" within the timeout; a longer one is read up to its length; a bad
    Content-Length is 400."""
    async with inmemory_server(admin_token=TOKEN, handshake_timeout=1.0) as srv:
        body = json.dumps({"user": "mallory"}).encode()
        short = admin_request(srv.port, "POST", "/admin/kick", raw_body=body)
        short = short.replace(b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 40))
        for half_close in (True, False):  # the client shuts its side, or just stops sending
            answer = json.loads((await exchange(srv, short, half_close=half_close)).body)
            assert "did not arrive whole" in answer["error"], answer
        long = admin_request(srv.port, "POST", "/admin/kick", raw_body=body + b"garbage after")
        long = long.replace(b"Content-Length: %d" % (len(body) + 13), b"Content-Length: %d" % len(body))
        assert {"kicked": "mallory"} == json.loads((await exchange(srv, long)).body)
        for length in (b"abc", b"-5", b"1, 2", b"99999999999999999999999"):
            bad = admin_request(srv.port, "POST", "/admin/kick", raw_body=body)
            bad = bad.replace(b"Content-Length: %d" % len(body), b"Content-Length: " + length)
            response = await exchange(srv, bad, half_close=True)
            assert response.status in (400, 413), (length, response)
        await assert_calm(srv)


async def test_a_slow_body_within_the_timeout_is_read() -> None:
    """A body dribbled a few bytes at a time, all within the timeout, is read whole."""
    async with inmemory_server(admin_token=TOKEN, handshake_timeout=3.0) as srv:
        request = admin_request(srv.port, "POST", "/admin/bans", body={"user": "slowpoke", "duration": 60})
        head, _, body = request.partition(b"\r\n\r\n")
        async with open_tcp(srv) as conn:
            await conn.send(head + b"\r\n\r\n")
            for start in range(0, len(body), 4):
                await conn.send(body[start : start + 4])
                await trio.sleep(0.05)  # pacing a slow sender, not waiting for an event
            with trio.fail_after(10):
                response = parse_response(await conn.read_to_eof())
        assert 201 == response.status, response
        assert "slowpoke" == json.loads(response.body)["ban"]["user"]


async def assert_calm(srv: InMemoryServer) -> None:
    """The server still serves: a client's round trip, /health, the API."""
    async with connect(srv, "calm") as calm:
        await calm.request({"type": "ping"}, "pong")
    assert "ok" == (await health(srv))["status"]
    assert 200 == (await admin(srv, "GET", "/admin/bans")).status


_METHODS = st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "TRACE", "FOO"])
_SEGMENTS = st.sampled_from(
    ["reports", "bans", "users", "kick", "mallory", "", "..", "%2e%2e", "a:b", "x" * 300, "%00", "é", "?x=1"]
) | st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12)
_AUTH = st.sampled_from([f"Bearer {TOKEN}", "Bearer nope", "Basic eA==", "", "Bearer " + "x" * 5000, None])
_BODIES = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"{}", b'{"user":"mallory"}', b'{"user":"m","duration":1e400}', b"[" * 5000]),
    st.dictionaries(
        st.sampled_from(["user", "duration", "reason", "shadow", "extra"]),
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        max_size=5,
    ).map(lambda data: json.dumps(data).encode()),
)
_LENGTH = st.sampled_from(["right", "short", "long", "missing", "junk"])


@st.composite
def hostile_requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A request head and body, with the Content-Length right or wrong; whether to half-close."""
    method = draw(_METHODS)
    path = "/admin/" + "/".join(draw(st.lists(_SEGMENTS, max_size=3)))
    body = draw(_BODIES)
    auth = draw(_AUTH)
    length = draw(_LENGTH)
    lines = [f"{method} {path} HTTP/1.1", "Host: x"]
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    declared = {"right": len(body), "short": max(0, len(body) - 3), "long": len(body) + 7}.get(length)
    if declared is not None:
        lines.append(f"Content-Length: {declared}")
    elif length == "junk":
        lines.append("Content-Length: 12abc")
    extra = draw(st.lists(st.sampled_from(["X-A: \x01", "Content-Type: text/html", "Expect: 100-continue"])))
    head = ("\r\n".join(lines + extra) + "\r\n\r\n").encode("utf-8", "surrogatepass")
    return head + body, length != "long" or draw(st.booleans())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile_requests(), min_size=1, max_size=8))
async def test_hostile_requests_are_answered_and_harm_nobody(requests: list[tuple[bytes, bool]]) -> None:
    """Arbitrary methods, paths, headers, bodies and Content-Lengths to /admin: every request
    gets an HTTP answer (4xx, or 2xx where it happens to be valid) within the timeout, a
    calm client's round trips go on meanwhile, and the server is up after."""
    async with inmemory_server(admin_token=TOKEN, handshake_timeout=1.0) as srv:
        async with connect(srv, "calm-one") as calm:
            statuses: list[int] = []

            async def one(data: bytes, half_close: bool) -> None:
                statuses.append((await exchange(srv, data, half_close=half_close)).status)

            async with trio.open_nursery() as nursery:
                for data, half_close in requests:
                    nursery.start_soon(one, data, half_close)
                for _ in range(5):
                    with trio.fail_after(2):
                        await calm.request({"type": "ping"}, "pong")
        assert len(requests) == len(statuses)
        assert all(status < 500 for status in statuses), statuses
        await assert_calm(srv)
