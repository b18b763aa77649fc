"""ICE servers and TURN credentials (PROTOCOL.md section 14): the credential rules and the
settings (pure), the core's replies and privacy-mode relay (pure, as in test_rules.py), and
the reply shapes end to end in the in-memory tier. That coturn accepts the credentials is
tests/test_turn.py; the browser side is tests/browser/test_turn_calls.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from inmemory import FakePeer, connect, inmemory_server
from test_rules import facts, request, run
from trio.testing import MockClock
from webrtc_samples import CHROMIUM_HOST, CHROMIUM_RELAY, CHROMIUM_SDP_ALL

from aleatoria import core
from aleatoria import messages as m
from aleatoria.cli import main
from aleatoria.config import ConfigError, from_environment
from aleatoria.core import Rules
from aleatoria.errors import ClientError
from aleatoria.ice import IcePolicy, ice_servers, turn_credential, turn_username, url_problem
from aleatoria.matchmaking import RequestOutcome
from aleatoria.privacy import scrub_sdp

SECRET = "north"
TURN = ("stun:stun.example.net", "turn:turn.example.net:3478?transport=udp", "turns:turn.example.net:5349")
POLICY = IcePolicy(urls=TURN, secrets=(SECRET, "old"), ttl=600)
NOW = 1_764_000_000  # the clock of test_rules.facts, in seconds


# -- credentials ----------------------------------------------------------------------------------


def test_turn_rest_credentials_match_an_independent_computation() -> None:
    """username "<expiry>:<userId>", credential base64(HMAC-SHA1(secret, username)); the
    expected value was computed with `openssl dgst -sha1 -hmac north -binary | base64`."""
    assert "1700003600:alice" == turn_username("alice", 1_700_000_000, 3600)
    assert "wjwSXO2ch1B6VaLTLMy2Avn5O9o=" == turn_credential("north", "1700003600:alice")


@given(st.text(min_size=1, max_size=40), st.from_regex(r"[A-Za-z0-9_.@-]{1,64}", fullmatch=True))
def test_credential_is_hmac_sha1_of_the_username(secret: str, user: str) -> None:
    username = turn_username(user, NOW, 3600)
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    assert base64.b64encode(digest).decode() == turn_credential(secret, username)
    assert (str(NOW + 3600), user) == tuple(username.split(":", 1))


def test_ice_servers_shape() -> None:
    """STUN URLs in one entry, TURN URLs in one with credentials signed by the first secret."""
    username = f"{NOW + 600}:alice"
    expected = [
        {"urls": ["stun:stun.example.net"]},
        {"urls": list(TURN[1:]), "username": username, "credential": turn_credential(SECRET, username)},
    ]
    assert expected == ice_servers(POLICY, "alice", NOW)
    assert [{"urls": ["stun:a.example"]}] == ice_servers(IcePolicy(urls=("stun:a.example",)), "alice", NOW)
    assert [] == ice_servers(IcePolicy(), "alice", NOW)


def test_ice_urls_are_checked() -> None:
    good = [
        "stun:stun.l.google.com:19302",
        "stun:[2001:db8::1]:3478",
        "turn:198.51.100.7",
        "turn:turn.example.net:3478?transport=tcp",
        "turns:turn.example.net:5349",
    ]
    bad = [
        "turn://turn.example.net",
        "http://turn.example.net",
        "stun:",
        "turn:host:0",
        "turn:host:70000",
        "turn:host?transport=quic",
        "stun:host?transport=udp",
        "turn:user@host",
        "turn:host name",
    ]
    assert [None] * len(good) == [url_problem(url) for url in good]
    for url in bad:
        assert url_problem(url), url


# -- settings -------------------------------------------------------------------------------------


def test_settings_from_the_environment() -> None:
    config = from_environment(
        {
            "ALEATORIA_ICE_URLS": " stun:s.example , turn:t.example:3478 ",
            "ALEATORIA_TURN_SECRET": "n3w-s3cret,0ld-s3cret",
            "ALEATORIA_TURN_TTL": "120",
            "ALEATORIA_RELAY_ONLY": "1",
        }
    )
    assert (
        IcePolicy(("stun:s.example", "turn:t.example:3478"), ("n3w-s3cret", "0ld-s3cret"), 120, True)
        == config.ice
    )
    assert "s3cret" not in repr(config) + repr(config.ice)  # the secrets stay out of logs
    assert IcePolicy() == from_environment({}).ice


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"ALEATORIA_ICE_URLS": "turn://t.example"}, "ALEATORIA_ICE_URLS"),
        ({"ALEATORIA_ICE_URLS": "turn:t.example"}, "ALEATORIA_TURN_SECRET"),
        ({"ALEATORIA_ICE_URLS": "stun:s.example", "ALEATORIA_TURN_SECRET": "x"}, "no turn:"),
        ({"ALEATORIA_RELAY_ONLY": "1"}, "ALEATORIA_RELAY_ONLY"),
        ({"ALEATORIA_RELAY_ONLY": "1", "ALEATORIA_ICE_URLS": "stun:s.example"}, "ALEATORIA_RELAY_ONLY"),
        (
            {"ALEATORIA_ICE_URLS": "turn:t.example", "ALEATORIA_TURN_SECRET": "x", "ALEATORIA_TURN_TTL": "5"},
            "ALEATORIA_TURN_TTL",
        ),
        ({"ALEATORIA_TURN_TTL": "soon"}, "ALEATORIA_TURN_TTL"),
        ({"ALEATORIA_RELAY_ONLY": "maybe"}, "ALEATORIA_RELAY_ONLY"),
    ],
)
def test_unusable_settings_are_refused(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        from_environment(environ)


def test_serve_refuses_relay_only_without_turn(capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI has the flags and explains a setting it cannot use, before binding anything."""
    assert 0 != main(["serve", "--port", "0", "--relay-only"])
    assert "ALEATORIA_RELAY_ONLY" in capsys.readouterr().err


# -- the core's rules -----------------------------------------------------------------------------


def test_get_ice_servers_reply() -> None:
    step = core.handle(request({"type": "get_ice_servers"}), facts(rules=Rules(ice=POLICY)))
    expected = m.IceServers(
        ice_servers=ice_servers(POLICY, "alice", NOW), ice_transport_policy="all", ttl=600
    )
    assert [core.Reply(m.ICE_SERVERS, expected)] == run(step)
    relay_only = IcePolicy(urls=TURN, secrets=(SECRET,), relay_only=True)
    step = core.handle(request({"type": "get_ice_servers"}), facts(rules=Rules(ice=relay_only)))
    assert "relay" == run(step)[0].payload.ice_transport_policy
    unconfigured = run(core.handle(request({"type": "get_ice_servers"}), facts()))
    assert [
        core.Reply(m.ICE_SERVERS, m.IceServers(ice_servers=[], ice_transport_policy="all", ttl=3600))
    ] == (unconfigured)


def matched_effects(rules: Rules) -> list[Any]:
    step = core.handle(request({"type": "request_random_peer"}), facts(rules=rules))
    return run(step, RequestOutcome(peer="bob", role="impolite"))


def test_assign_role_carries_each_side_its_own_credentials() -> None:
    """Both sides get iceServers (credentials naming themselves) and iceTransportPolicy."""
    effects = matched_effects(Rules(ice=POLICY))
    reply = next(e for e in effects if isinstance(e, core.Reply))
    assert (
        m.AssignRole(
            role="impolite",
            peer_id="bob",
            common_interests=[],
            ice_servers=ice_servers(POLICY, "alice", NOW),
            ice_transport_policy="all",
        )
        == reply.payload
    )
    deliver = next(e for e in effects if isinstance(e, core.Deliver))
    assert {
        "role": "polite",
        "peerId": "alice",
        "commonInterests": [],
        "iceServers": ice_servers(POLICY, "bob", NOW),
        "iceTransportPolicy": "all",
    } == orjson.loads(deliver.data)["payload"]


def test_assign_role_without_ice_servers_is_the_original() -> None:
    """No ICE settings: assign_role is what the original server sent, plus section 12's
    commonInterests (and matchId: this outcome has none)."""
    deliver = next(e for e in matched_effects(Rules()) if isinstance(e, core.Deliver))
    assert {"role": "polite", "peerId": "alice", "commonInterests": []} == orjson.loads(deliver.data)[
        "payload"
    ]


def relayed(payload: Any, kind: str, rules: Rules) -> Any:
    """The payload bob receives of alice's ``kind``, or None if nothing is relayed."""
    step = core.handle(request({"type": kind, "toUser": "bob", "payload": payload}), facts(rules=rules))
    if isinstance(step.call, core.Hangup) and step.then is not None:
        step = step.then(None)  # a hangup ends the match first, then is relayed
    if step.call is None:
        assert () == step.effects
        return None
    assert isinstance(step.call, core.Relay)
    return orjson.loads(step.call.data)["payload"]


PRIVATE = Rules(ice=IcePolicy(urls=TURN, secrets=(SECRET,), relay_only=True))


def test_privacy_mode_relays_only_relay_candidates() -> None:
    """Host and srflx candidates are dropped silently (no error to the sender), relay ones
    and end-of-candidates pass, SDP loses its host lines; hangup is untouched."""
    candidate = {"candidate": CHROMIUM_HOST, "sdpMid": "0", "sdpMLineIndex": 0}
    assert None is relayed(candidate, "webrtc_candidate", PRIVATE)
    relay = {"candidate": CHROMIUM_RELAY, "sdpMid": "0", "sdpMLineIndex": 0}
    assert relay == relayed(relay, "webrtc_candidate", PRIVATE)
    end = {"candidate": "", "sdpMid": "0"}
    assert end == relayed(end, "webrtc_candidate", PRIVATE)
    offer = {"type": "offer", "sdp": CHROMIUM_SDP_ALL}
    assert {"type": "offer", "sdp": scrub_sdp(CHROMIUM_SDP_ALL)} == relayed(offer, "webrtc_offer", PRIVATE)
    assert {"reason": "next"} == relayed({"reason": "next"}, "hangup", PRIVATE)


def test_without_privacy_mode_everything_is_relayed_unchanged() -> None:
    candidate = {"candidate": CHROMIUM_HOST, "sdpMid": "0"}
    assert candidate == relayed(candidate, "webrtc_candidate", Rules(ice=POLICY))
    offer = {"type": "offer", "sdp": CHROMIUM_SDP_ALL}
    assert offer == relayed(offer, "webrtc_offer", Rules(ice=POLICY))


def test_privacy_mode_still_refuses_signaling_into_someone_elses_call() -> None:
    busy = facts(matches={"bob": "carol"}, rules=PRIVATE)
    with pytest.raises(ClientError):
        core.handle(request({"type": "webrtc_candidate", "toUser": "bob", "payload": None}), busy)


# -- in-memory tier: the replies end to end ---------------------------------------------------------


async def matched_pair(alice: FakePeer, bob: FakePeer) -> tuple[dict[str, Any], dict[str, Any]]:
    await bob.send({"type": "user_available_webrtc"})
    await alice.send({"type": "request_random_peer"})
    return await alice.expect("assign_role"), await bob.expect("assign_role")


async def test_ice_servers_end_to_end(autojump_clock: MockClock) -> None:
    """get_ice_servers and assign_role as clients see them, with credentials valid for ttl
    from the server's clock."""
    async with (
        inmemory_server(ice_urls=TURN, turn_secret=("s1", "s0"), turn_ttl=900, relay_only=True) as server,
        connect(server, "alice") as alice,
        connect(server, "bob") as bob,
    ):
        reply = await alice.request({"type": "get_ice_servers"}, "ice_servers")
        assert ("system", "alice") == (reply["fromUser"], reply["toUser"])
        payload = reply["payload"]
        assert ["iceServers", "iceTransportPolicy", "ttl"] == sorted(payload)
        assert ("relay", 900) == (payload["iceTransportPolicy"], payload["ttl"])
        stun, turn = payload["iceServers"]
        assert {"urls": [TURN[0]]} == stun
        expiry, user = turn["username"].split(":")
        assert "alice" == user
        assert turn_credential("s1", turn["username"]) == turn["credential"]
        mine, theirs = await matched_pair(alice, bob)
        for message, user in ((mine, "alice"), (theirs, "bob")):
            servers = message["payload"]["iceServers"]
            assert "relay" == message["payload"]["iceTransportPolicy"]
            assert user == servers[1]["username"].split(":")[1]
            assert int(expiry) <= int(servers[1]["username"].split(":")[0])


async def test_privacy_mode_end_to_end(autojump_clock: MockClock) -> None:
    """In privacy mode bob gets alice's relay candidate and scrubbed SDP, never her host
    candidate; alice gets no error for the one dropped."""
    async with (
        inmemory_server(ice_urls=TURN, turn_secret=("s1",), relay_only=True) as server,
        connect(server, "alice") as alice,
        connect(server, "bob") as bob,
    ):
        await matched_pair(alice, bob)
        for candidate in (CHROMIUM_HOST, CHROMIUM_RELAY):
            await alice.send(
                {"type": "webrtc_candidate", "toUser": "bob", "payload": {"candidate": candidate}}
            )
        await alice.send(
            {"type": "webrtc_offer", "toUser": "bob", "payload": {"type": "offer", "sdp": CHROMIUM_SDP_ALL}}
        )
        await alice.request({"type": "ping"}, "pong")  # no error came before it
        assert {"candidate": CHROMIUM_RELAY} == (await bob.expect("webrtc_candidate"))["payload"]
        offer = (await bob.expect("webrtc_offer"))["payload"]
        assert {"type": "offer", "sdp": scrub_sdp(CHROMIUM_SDP_ALL)} == offer
        assert "192.0.2.2" not in offer["sdp"]
