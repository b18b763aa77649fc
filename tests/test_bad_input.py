"""Bad input at the message level: always answered, never fatal, nobody else affected. The
in-memory tier (tests/inmemory.py); bad bytes and frames are test_fuzz.py's and
test_websocket_edge.py's, over real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from inmemory import Closed, connect, inmemory_server
from inmemory import FakePeer as Peer
from inmemory import InMemoryServer as RunningServer
from trio.testing import MockClock


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    async with inmemory_server() as running:
        yield running


async def still_works(*peers: Peer) -> None:
    for peer in peers:
        await peer.request({"type": "ping"}, "pong")


@pytest.mark.parametrize(
    ("frame", "details"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got an array"),
        ('"text"', "expected a JSON object, got a string"),
        ("null", "expected a JSON object, got null"),
        ('{"room": "Lobby"}', "missing required field 'type'"),
        ('{"type": 7}', "$.type"),
        ('{"type": "chat_message", "toUser": 5}', "$.toUser"),
        ('{"type": "chat_message", "room": ["Lobby"]}', "$.room"),
        ('{"type": "chat_message", "fromUser": {}}', "$.fromUser"),
        ('{"type": "chat_message", "messageId": 1}', "$.messageId"),
        ('{"type": "chat_message", "createTime": 1}', "$.createTime"),
        ('{"type": "chat_message", "incoming": "yes"}', "$.incoming"),
        # A lone surrogate, also where a 20-digit number sends the frame to the other parser:
        # an interest like this once reached the search queue, failed to encode in its
        # announcement and ended the server.
        ('{"type": "chat_message", "toUser": "bob", "payload": {"content": "\\ud800"}}', "not valid JSON"),
        (
            '{"type": "request_random_peer", "payload": {"wait": true, "interests": ["\\ud800"]},'
            ' "n": 12345678901234567890}',
            "not valid JSON",
        ),
        (
            '{"type": "report_user", "payload": {"user": "bob", "reason": "spam", "details": "\\ud800",'
            ' "n": 12345678901234567890}}',
            "not valid JSON",
        ),
    ],
)
async def test_malformed_frames_get_error_response(
    server: RunningServer, autojump_clock: MockClock, frame: str, details: str
) -> None:
    """Invalid structure: error_response with details and an err- messageId; the connection
    and other connections keep working."""
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        await alice.send(frame)
        reply = await alice.expect("error_response")
        assert (reply["fromUser"], reply["toUser"]) == ("system", "alice")
        assert reply["messageId"].startswith("err-")
        assert reply["payload"]["error"] == "Invalid message structure"
        assert details in reply["payload"]["details"]
        await still_works(alice, bob)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"type": "no_such_type"}, "unknown_type"),
        ({"type": "chat_message", "room": "Lobby", "payload": {"content": 5}}, "invalid_payload"),
        ({"type": "chat_message", "room": "Lobby", "payload": "hi"}, "invalid_payload"),
        ({"type": "chat_message", "room": "Lobby"}, "invalid_payload"),
        ({"type": "chat_message", "room": "Lobby", "payload": {"content": "x" * 4001}}, "too_large"),
        ({"type": "chat_message", "room": "a:b", "payload": {"content": "x"}}, "invalid_payload"),
        ({"type": "chat_message", "room": "", "payload": {"content": "x"}}, "invalid_payload"),
        ({"type": "chat_message", "toUser": "x" * 10_000, "payload": {"content": "x"}}, "too_large"),
        ({"type": "join_room", "room": "a:b"}, "invalid_payload"),
        ({"type": "join_room", "room": "r" * 65}, "too_large"),
        ({"type": "join_room"}, "invalid_target"),
        ({"type": "webrtc_offer", "toUser": "a b", "payload": {}}, "invalid_payload"),
        ({"type": "request_random_peer", "payload": {"currentPeerId": 3}}, "invalid_payload"),
        ({"type": "request_random_peer", "payload": []}, "invalid_payload"),
        ({"type": "get_recent_messages", "room": "Lobby", "payload": {"before": "never"}}, "invalid_payload"),
        ({"type": "get_recent_messages", "room": "Lobby", "payload": {"limit": 1.5}}, "invalid_payload"),
        ({"type": "get_direct_messages", "payload": {"withUser": "a:b"}}, "invalid_payload"),
        ({"type": "ping", "messageId": "m" * 129}, "too_large"),
    ],
)
async def test_bad_requests_get_error_codes(
    server: RunningServer, autojump_clock: MockClock, message: dict[str, object], code: str
) -> None:
    """Each refused request gets an error with the right code; nothing else happens."""
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        await alice.send(message)
        reply = await alice.expect("error")
        assert code == reply["payload"]["code"], reply
        assert reply["payload"]["error"]
        await still_works(alice, bob)


async def test_content_limit_counts_code_points(server: RunningServer, autojump_clock: MockClock) -> None:
    """4,000 emoji are 4,000 characters (not 16,000 bytes): accepted."""
    async with connect(server, "alice") as alice:
        await alice.send({"type": "chat_message", "room": "Lobby", "payload": {"content": "🙂" * 4000}})
        assert len((await alice.expect("chat_message"))["payload"]["content"]) == 4000


async def test_message_id_of_128_chars_is_kept(server: RunningServer, autojump_clock: MockClock) -> None:
    """A client messageId up to 128 characters is kept as sent."""
    async with connect(server, "alice") as alice:
        await alice.send(
            {"type": "chat_message", "room": "Lobby", "messageId": "m" * 128, "payload": {"content": "x"}}
        )
        assert (await alice.expect("chat_message"))["messageId"] == "m" * 128


async def test_rate_limit_refuses_then_closes_abusers(autojump_clock: MockClock) -> None:
    """Over the rate: rate_limited errors and the message is not processed; sustained abuse
    closes with 1008; a well-behaved client in the same room is unaffected."""
    async with (
        inmemory_server(rate_limit=5.0, rate_burst=5, rate_abuse_seconds=2.0) as srv,
        connect(srv, "flood") as flood,
        connect(srv, "calm") as calm,
    ):
        for i in range(6):
            await flood.send({"type": "chat_message", "room": "Lobby", "payload": {"content": str(i)}})
        codes: list[str] = []
        delivered: list[str] = []
        while len(codes) + len(delivered) < 6:
            message = await flood.recv()
            if message["type"] == "error":
                codes.append(message["payload"]["code"])
            else:
                delivered.append(message["payload"]["content"])
        assert (codes, delivered) == (["rate_limited"], ["0", "1", "2", "3", "4"])
        # calm received exactly the five accepted messages.
        assert [(await calm.expect("chat_message"))["payload"]["content"] for _ in range(5)] == [
            "0",
            "1",
            "2",
            "3",
            "4",
        ]
        with pytest.raises(Closed) as closed:
            for _ in range(100):
                await flood.send('{"type":"ping"}')
            while True:
                await flood.recv()
        assert closed.value.code == 1008
        await calm.request({"type": "ping"}, "pong")
