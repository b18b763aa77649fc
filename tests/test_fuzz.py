"""Property tests: arbitrary client frames, handshake bytes, fragmentations and relayed
payloads never hurt the server, and what it sends back is well-formed.

How these run. Hypothesis and trio meet through pytest-trio: an ``async`` test decorated
with ``@given`` has each example run in a fresh ``trio.run`` (pytest-trio wraps Hypothesis'
inner test). Each example therefore starts its own in-process server on port 0 and pushes
a *list* of inputs (20–50 frames for the main property) through it, which keeps the
per-example start-up cost small and lets state build up within an example (rooms joined,
pool entries, matches). No pytest fixtures are used by the examples (Hypothesis would share
one function-scoped fixture across them). Deterministic tests at the end pin the cases the
fuzzers found.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inmemory import InMemoryServer, inmemory_server
from rawws import BINARY, CONT, PING, PONG, TEXT, frame, open_raw_ws, open_tcp, upgrade_request
from support import Peer, connect

from aleatoria import messages as m

USER = "fuzzer"
SYSTEM_REPLIES = {
    m.ROOM_JOINED, m.ROOM_LEFT, m.ROOMS_LIST, m.ASSIGN_ROLE, m.NO_PEER_AVAILABLE,
    m.RECENT_MESSAGES, m.DIRECT_MESSAGES, m.ERROR, m.ERROR_RESPONSE, m.PONG,
    m.ROOMS_DIRECTORY, m.ROOM_MEMBERS, m.STATS, m.TOKEN_REFRESHED,
    m.USER_BLOCKED, m.USER_UNBLOCKED, m.BLOCKED_USERS, m.REPORT_RECEIVED, m.ICE_SERVERS,
}  # fmt: skip
CLIENT_TYPES = [
    m.CHAT_MESSAGE, m.JOIN_ROOM, m.LEAVE_ROOM, m.GET_ROOMS, m.USER_AVAILABLE, m.USER_UNAVAILABLE,
    m.REQUEST_RANDOM_PEER, m.WEBRTC_OFFER, m.WEBRTC_ANSWER, m.WEBRTC_CANDIDATE, m.HANGUP,
    m.GET_RECENT_MESSAGES, m.GET_DIRECT_MESSAGES, m.PING,
    m.LIST_ROOMS, m.GET_ROOM_MEMBERS, m.GET_STATS, m.REFRESH_TOKEN,
    m.BLOCK_USER, m.UNBLOCK_USER, m.GET_BLOCKED, m.REPORT_USER, m.GET_ICE_SERVERS,
]  # fmt: skip

# -- strategies -------------------------------------------------------------------------------

# Strings include lone surrogates: json.dumps escapes them ("\ud800"), which is valid JSON
# syntax but not valid Unicode, a classic parser edge.
any_text = st.text(st.characters(exclude_categories=()), max_size=20)
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: beyond 64 bits too
    | st.floats()  # NaN and ±Infinity serialise to non-standard JSON tokens
    | any_text
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=12,
)
ids = st.sampled_from(["Lobby", USER, "ghost", "room-1", "", "a:b", "x" * 65, "sync.0"])
id_like = ids | json_values
payloads = json_values | st.fixed_dictionaries(
    {},
    optional={
        "content": st.sampled_from(["hi", "", "x" * 4001]) | json_values,
        "limit": st.integers(-(2**70), 2**70) | json_values,
        "before": st.sampled_from(["2026-01-01T00:00:00Z", "0001-01-01T00:00:00+14:00", "nope"])
        | json_values,
        "withUser": id_like,
        "currentPeerId": id_like,
        # Safety (block_user, unblock_user, report_user).
        "user": id_like,
        "reason": st.sampled_from(["spam", "hate", "boring", ""]) | json_values,
        "details": st.sampled_from(["", "d" * 501]) | json_values,
        "matchId": st.sampled_from(["m-1", "m" * 129]) | json_values,
    },
)
envelopes = st.fixed_dictionaries(
    {"type": st.sampled_from([*CLIENT_TYPES, *sorted(SYSTEM_REPLIES)]) | any_text | json_values},
    optional={
        "room": id_like,
        "toUser": id_like,
        "fromUser": id_like,
        "payload": payloads,
        "messageId": st.sampled_from(["m1", "m" * 129]) | json_values,
        "createTime": st.sampled_from(["1999-01-01T00:00:00Z"]) | json_values,
        "incoming": json_values,
    },
)
client_frames = st.one_of(
    envelopes.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=60),  # arbitrary text, mostly not JSON
    st.binary(max_size=60),  # binary frames: accepted like text, often not UTF-8
)


# -- helpers ------------------------------------------------------------------------------------


def live_tasks() -> int:
    """Every task in this trio run: the root task and all its descendants."""

    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return count(root)


async def quiet_task_count() -> int:
    """The task count once every task that can run has run (the server's own tasks start
    after it reports its port)."""
    await trio.testing.wait_all_tasks_blocked(cushion=0.01)
    return live_tasks()


async def settle_to(baseline: int) -> None:
    """Wait (bounded) until the task count is back to ``baseline``: each pass lets every
    runnable task run, then re-counts."""
    with trio.fail_after(5):
        while baseline != (now := live_tasks()):
            await trio.testing.wait_all_tasks_blocked(cushion=0.01)
    assert baseline == now


@contextmanager
def server_errors() -> Iterator[list[logging.LogRecord]]:
    """Collect ERROR records of the server's loggers (an escaped exception is logged by the
    connection's error boundary: the server survives it, the test must not)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign,assignment]
    logger = logging.getLogger("aleatoria")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def check_frame(message: Any) -> None:
    """A server frame is a JSON object with string ``type``/``fromUser``, no nulls, and
    server-originated replies are addressed to the receiver."""
    assert isinstance(message, dict), message
    assert isinstance(message.get("type"), str), message
    assert isinstance(message.get("fromUser"), str), message
    assert None not in message.values(), message
    if message["type"] in SYSTEM_REPLIES:
        assert (m.SYSTEM, USER) == (message["fromUser"], message.get("toUser")), message
    if message["type"] == m.ERROR_RESPONSE:
        assert message["messageId"].startswith("err-"), message
    if message["type"] == m.ERROR:
        assert isinstance(message["payload"]["code"], str), message


async def sync(peer: Peer, marker: str) -> int:
    """Ask for something only this call asks for (the DM history with ``marker``) and read
    until its answer, checking every frame on the way. ``pong`` carries no messageId, so a
    fuzzed ``ping`` would make a ping-based sync ambiguous. Returns the frames read."""
    await peer.send({"type": m.GET_DIRECT_MESSAGES, "payload": {"withUser": marker}})
    read = 0
    while True:
        message = await peer.recv(timeout=5)
        read += 1
        check_frame(message)
        if message["type"] == m.DIRECT_MESSAGES and marker == message["payload"]["withUser"]:
            return read


async def assert_serves_others(server: InMemoryServer) -> None:
    async with connect(server, "second") as second:
        await second.send({"type": "chat_message", "room": "Lobby", "payload": {"content": "ok"}})
        assert "ok" == (await second.expect("chat_message"))["payload"]["content"]
        await second.request({"type": "ping"}, "pong")


# -- client frames ----------------------------------------------------------------------------


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(frames=st.lists(client_frames, min_size=20, max_size=50))
async def test_arbitrary_frames_never_hurt_the_server(frames: list[str | bytes]) -> None:
    """Arbitrary frames get well-formed JSON or nothing, never close the connection, leak no task.

    One trio.run and one server per example through pytest-trio's Hypothesis support (see
    the module docstring); each example sends 20–50 frames, each followed by a sync request.
    """
    with server_errors() as errors:
        async with inmemory_server() as server:
            baseline = await quiet_task_count()
            async with connect(server, USER) as peer:
                for i, data in enumerate(frames):
                    await peer.ws.send_message(data)
                    await sync(peer, f"sync.{i}")
            await settle_to(baseline)
            await assert_serves_others(server)
            await settle_to(baseline)
    assert [] == [r.getMessage() for r in errors]


# -- handshake bytes ----------------------------------------------------------------------------

VALID_HEADS = [
    upgrade_request(8085, "/ws?userId=fuzz&room=Lobby"),
    upgrade_request(8085, "/health", upgrade=False),
    upgrade_request(8085, "/health", method="HEAD", upgrade=False),
    upgrade_request(8085, "/nope", upgrade=False),
]


@st.composite
def mutated_heads(draw: st.DrawFn) -> bytes:
    """A valid request head with a few random edits (flip, insert, delete, cut, repeat)."""
    head = bytearray(draw(st.sampled_from(VALID_HEADS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "cut", "repeat"]))
        at = draw(st.integers(0, len(head)))
        if op == "flip" and at < len(head):
            head[at] = draw(st.integers(0, 255))
        elif op == "insert":
            head[at:at] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from([b"\r\n", b":", b" "]))
        elif op == "delete":
            del head[at : at + draw(st.integers(1, 8))]
        elif op == "cut":
            del head[at:]
        elif op == "repeat":
            head[at:at] = head[: draw(st.integers(0, len(head)))]
    return bytes(head)


ANSWERS = {101, 200, 400, 403, 404, 405, 431}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=st.lists(st.binary(max_size=200) | mutated_heads(), min_size=5, max_size=15))
async def test_arbitrary_handshake_bytes_never_hurt_the_server(inputs: list[bytes]) -> None:
    """Random and mutated request heads get no answer or one well-formed HTTP answer; nothing leaks."""
    with server_errors() as errors:
        async with inmemory_server() as server:
            baseline = await quiet_task_count()
            for data in inputs:
                async with open_tcp(server) as conn:
                    await conn.send(data)
                    await conn.stream.send_eof()
                    with trio.fail_after(10):
                        raw = await conn.read_to_eof()
                if raw:
                    assert raw.startswith(b"HTTP/1.1 "), raw[:80]
                    assert int(raw[9:12]) in ANSWERS, raw[:80]
            await settle_to(baseline)
            await assert_serves_others(server)
    assert [] == [r.getMessage() for r in errors]


# -- fragmentation ------------------------------------------------------------------------------


@st.composite
def fragmented_messages(draw: st.DrawFn) -> tuple[str, int, list[bytes], list[bool]]:
    """A chat message cut at random byte offsets (UTF-8 characters included), sent as text
    or binary, with pings drawn between its fragments."""
    content = draw(st.text(max_size=40))
    body = json.dumps(
        {"type": "chat_message", "room": "Lobby", "payload": {"content": content}}, ensure_ascii=False
    ).encode()
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=6)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    pings = draw(st.lists(st.booleans(), min_size=len(pieces) - 1, max_size=len(pieces) - 1))
    return content, draw(st.sampled_from([TEXT, BINARY])), pieces, pings


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(fragmented_messages(), min_size=1, max_size=8))
async def test_random_fragmentation_is_reassembled(
    messages: list[tuple[str, int, list[bytes], list[bool]]],
) -> None:
    """However a message is fragmented (empty, mid-character, pings between), it arrives whole."""
    async with inmemory_server() as server, open_raw_ws(server, USER) as ws:
        for content, opcode, pieces, pings in messages:
            expected_pongs = []
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1
                await ws.send_frame(frame(opcode if i == 0 else CONT, piece, fin=last))
                if not last and pings[i]:
                    await ws.send_frame(frame(PING, b"%d" % i))
                    expected_pongs.append(b"%d" % i)
            pongs = [(await ws.read_frame(timeout=5)) for _ in expected_pongs]
            assert [(PONG, p) for p in expected_pongs] == [(f.opcode, f.payload) for f in pongs]
            delivered = await ws.expect(m.CHAT_MESSAGE, timeout=5)
            assert content == delivered["payload"]["content"]


# -- relayed payloads ---------------------------------------------------------------------------

# Valid JSON only (no NaN/Infinity) and valid Unicode (no lone surrogates): what a browser's
# JSON.stringify can produce; integers within 64 bits (PROTOCOL.md section 16 refuses others).
relayable = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(relayable, min_size=10, max_size=30))
async def test_relayed_payload_is_the_same_json_value(payloads: list[Any]) -> None:
    """A relayed payload is the same JSON value as sent; a null payload is omitted, never null."""
    async with inmemory_server() as server, connect(server, USER) as peer:
        for payload in payloads:
            await peer.send({"type": m.WEBRTC_CANDIDATE, "toUser": USER, "payload": payload})
            relayed = await peer.expect(m.WEBRTC_CANDIDATE, timeout=5)
            assert payload == relayed.get("payload")
            assert (payload is None) == ("payload" not in relayed)


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("kind", [m.WEBRTC_OFFER, m.CHAT_MESSAGE])
async def test_payload_deeper_than_orjson_writes_is_delivered(server: InMemoryServer, kind: str) -> None:
    """A payload nested 260 deep (orjson writes at most 254 levels) is delivered unchanged."""
    target = {"toUser": USER} if kind == m.WEBRTC_OFFER else {"room": "Lobby"}
    async with connect(server, USER) as peer:
        payload = {"content": "x", "deep": _nested(260)}
        delivered = await peer.request({"type": kind, "payload": payload, **target}, kind)
        assert payload == delivered["payload"]
        await peer.request({"type": "ping"}, "pong")


@pytest.mark.parametrize("kind", [m.WEBRTC_OFFER, m.CHAT_MESSAGE])
async def test_payload_too_deep_to_write_is_refused_not_fatal(server: InMemoryServer, kind: str) -> None:
    """A payload nested 1000 deep gets error invalid_payload and the connection stays open."""
    head = json.dumps({"type": kind, **({"toUser": USER} if kind == m.WEBRTC_OFFER else {"room": "Lobby"})})
    too_deep = '{"content":"x","deep":' + "[" * 1000 + "0" + "]" * 1000 + "}"
    async with connect(server, USER) as peer:
        await peer.send(f'{head[:-1]}, "payload": {too_deep}}}')  # beyond json.dumps, too
        reply = await peer.recv()
        assert (m.ERROR, "invalid_payload") == (reply["type"], reply["payload"]["code"]), reply
        await peer.request({"type": "ping"}, "pong")


async def test_relayed_payload_keeps_64_bit_integers(server: InMemoryServer) -> None:
    """Integers up to 64 bits are relayed exactly (orjson alone would turn 20-digit ones into
    floats); beyond 64 bits the frame is refused (PROTOCOL.md section 16), never rounded."""
    payload = {"n": 2**64 - 1, "m": -(2**63), "big": 10**19}
    async with connect(server, USER) as peer:
        await peer.send({"type": m.WEBRTC_OFFER, "toUser": USER, "payload": payload})
        assert payload == (await peer.expect(m.WEBRTC_OFFER))["payload"]
        await peer.send({"type": m.WEBRTC_OFFER, "toUser": USER, "payload": {"n": 2**64}})
        await peer.expect(m.ERROR_RESPONSE)
