"""Privacy mode's filter (``aleatoria.privacy``, PROTOCOL.md section 14), tested pure: what a
peer may see of relayed candidates and SDP. Real Chromium output (captured against coturn on
loopback, relay-only and not), hostile hand-made lines, and hypothesis-built candidates and
SDP: no non-relay candidate and no address of the user's own ever gets through, and a relay
candidate changes only where its related address was."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st
from webrtc_samples import (
    CHROMIUM_HOST,
    CHROMIUM_HOST6,
    CHROMIUM_RELAY,
    CHROMIUM_SDP_ALL,
    CHROMIUM_SDP_RELAY,
    CHROMIUM_SRFLX,
    OWN_ADDRESSES,
)

from aleatoria import privacy
from aleatoria.privacy import is_candidate_line, scrub_candidate, scrub_sdp, scrub_signal


def lines_of(sdp: str) -> list[str]:
    return re.split(r"\r\n|\r|\n", sdp)


def test_chromium_candidates() -> None:
    """Chromium's relay candidate passes unchanged; its host (v4, v6) and srflx ones do not."""
    assert CHROMIUM_RELAY == scrub_candidate(CHROMIUM_RELAY)
    for candidate in (CHROMIUM_HOST, CHROMIUM_HOST6, CHROMIUM_SRFLX):
        assert None is scrub_candidate(candidate)


def test_chromium_sdp_keeps_only_relay_and_no_own_address() -> None:
    """From a gathered Chromium offer only the relay candidate is left, its raddr blanked, c=
    loses the host's address, and every other line is kept byte for byte with its CRLF."""
    scrubbed = scrub_sdp(CHROMIUM_SDP_ALL)
    for own in OWN_ADDRESSES:
        assert own not in scrubbed
    expected = CHROMIUM_SDP_ALL.replace("c=IN IP4 192.0.2.2", "c=IN IP4 0.0.0.0").replace(
        "raddr 192.0.2.2 rport 39848 generation 0 network-cost 999\r\na=ice",
        "raddr 0.0.0.0 rport 0 generation 0 network-cost 999\r\na=ice",
    )
    expected = "".join(
        line + "\r\n"
        for line in expected.split("\r\n")[:-1]
        if not line.startswith("a=candidate") or "typ relay" in line
    )
    assert expected == scrubbed


def test_chromium_relay_only_sdp_is_unchanged() -> None:
    """What Chromium sends with iceTransportPolicy relay needs no change at all."""
    assert CHROMIUM_SDP_RELAY == scrub_sdp(CHROMIUM_SDP_RELAY)
    assert CHROMIUM_SDP_RELAY.replace("\r\n", "\n") == scrub_sdp(CHROMIUM_SDP_RELAY.replace("\r\n", "\n"))


# -- hostile hand-made candidates ------------------------------------------------------------------

HOSTILE_DROPPED = [
    "candidate:1 1 udp 2122260223 10.0.0.5 54321 typ host",
    "candidate:1 1 UDP 2122260223 10.0.0.5 54321 TYP HOST",
    "candidate:1 1 udp 2122260223 4d2c1a3e-4f7e-4b5e-8f6a-1b2c3d4e5f60.local 54321 typ host",
    "candidate:1 1 udp 2122260223 2001:db8::5 54321 typ host generation 0",
    "candidate:2 1 udp 1686052607 203.0.113.9 61000 typ srflx raddr 10.0.0.5 rport 54321",
    "candidate:3 1 udp 1845501695 203.0.113.9 61001 typ prflx raddr 10.0.0.5 rport 54321",
    "candidate:4 1 tcp 1518280447 10.0.0.5 9 typ host tcptype active",
    # "relay" elsewhere, or typ twice: parsers could disagree on the type
    "candidate:5 1 udp 1 10.0.0.5 54321 typ host relay relay",
    "candidate:5 1 udp 1 10.0.0.5 54321 typ host typ relay",
    "candidate:5 1 udp 1 198.51.100.7 3478 typ relay typ host",
    "candidate:5 1 udp 1 10.0.0.5 typ relay",
    # line breaks and tabs smuggle a second candidate or confuse field splitting
    "candidate:6 1 udp 1 198.51.100.7 3478 typ relay\r\na=candidate:7 1 udp 1 10.0.0.5 9 typ host",
    "candidate:6 1 udp 1 198.51.100.7 3478 typ relay\na=candidate:7 1 udp 1 10.0.0.5 9 typ host",
    "candidate:6 1 udp 1 10.0.0.5\t3478 typ relay",
    "candidate:6\t1 udp 1 10.0.0.5 3478 typ relay",
    "candidate:6 1 udp 1 198.51.100.7 3478 typ relay raddr",
    "1 1 udp 1 198.51.100.7 3478 typ relay",
    "a=end-of-candidates",
    " ",
]


def test_hostile_candidates_are_dropped() -> None:
    for candidate in HOSTILE_DROPPED:
        assert None is scrub_candidate(candidate), candidate


def test_relay_candidates_lose_only_their_related_address() -> None:
    """raddr and rport are blanked wherever they stand; odd spacing, case and the rest stay."""
    cases = {
        "candidate:9 1 udp 41885439 198.51.100.7 50000 typ relay raddr 10.0.0.5 rport 54321 generation 0": (
            "candidate:9 1 udp 41885439 198.51.100.7 50000 typ relay raddr 0.0.0.0 rport 0 generation 0"
        ),
        "candidate:9  1 udp 41885439 2001:db8::7 50000  typ  RELAY  RADDR  2001:db8::5  RPORT  1 ": (
            "candidate:9  1 udp 41885439 2001:db8::7 50000  typ  RELAY  RADDR  0.0.0.0  RPORT  0 "
        ),
        "a=candidate:9 1 udp 4 198.51.100.7 50000 typ relay generation 0 rport 1 raddr x.local": (
            "a=candidate:9 1 udp 4 198.51.100.7 50000 typ relay generation 0 rport 0 raddr 0.0.0.0"
        ),
        "candidate:9 1 udp 4 198.51.100.7 5 typ relay": "candidate:9 1 udp 4 198.51.100.7 5 typ relay",
        "": "",
    }
    for given_text, expected in cases.items():
        assert expected == scrub_candidate(given_text)


def test_hostile_sdp() -> None:
    """LF, CRLF, lone CR, leading spaces and upper case: no host line survives, and o=, c= and
    a=rtcp: addresses that could be the user's are blanked (IPv6 as ::)."""
    sdp = (
        "v=0\no=- 1 2 IN IP4 10.0.0.5\ns=-\r\nt=0 0\r"
        "c=IN IP6 2001:db8::5\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\n"
        "a=rtcp:9 IN IP4 10.0.0.5\n"
        "a=rtcp:9\n"
        " a=candidate:1 1 udp 1 10.0.0.5 1 typ host\r\n"
        "A=CANDIDATE:1 1 udp 1 10.0.0.6 1 typ host\n"
        "a=candidate:1 1 udp 1 198.51.100.7 3478 typ relay raddr 10.0.0.7 rport 5\r"
        "a=candidate:2 1 udp 1 10.0.0.8 1 typ host\r\n"
        "a=remote-candidates:1 10.0.0.9 5000\r\n"
        "a=candidate:3 1 udp 1 abc.local 1 typ host\r\n"
        "a=end-of-candidates\r\n"
        "c=IN IP4 198.51.100.7\r\n"
        "c=IN IP4 224.2.1.1/127\r\n"
        "c=IN IP4\r\n"
    )
    expected = (
        "v=0\no=- 1 2 IN IP4 0.0.0.0\ns=-\r\nt=0 0\r"
        "c=IN IP6 ::\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\n"
        "a=rtcp:9 IN IP4 0.0.0.0\n"
        "a=rtcp:9\n"
        "a=candidate:1 1 udp 1 198.51.100.7 3478 typ relay raddr 0.0.0.0 rport 0\r"
        "a=end-of-candidates\r\n"
        "c=IN IP4 198.51.100.7\r\n"
        "c=IN IP4 0.0.0.0\r\n"
    )
    assert expected == scrub_sdp(sdp)


def test_sdp_without_a_final_line_break() -> None:
    assert "v=0\r\na=mid:0" == scrub_sdp("v=0\r\na=candidate:1 1 udp 1 10.0.0.5 1 typ host\r\na=mid:0")
    assert "" == scrub_sdp("")


# -- payload shapes (PROTOCOL.md section 14: where the server looks) ------------------------------


def test_candidate_payload_shapes() -> None:
    """A string candidate or RTCIceCandidateInit; other fields kept as they are."""
    relay = "candidate:9 1 udp 4 198.51.100.7 50000 typ relay raddr 10.0.0.5 rport 1"
    blanked = "candidate:9 1 udp 4 198.51.100.7 50000 typ relay raddr 0.0.0.0 rport 0"
    flat = {"candidate": relay, "sdpMid": "0", "sdpMLineIndex": 0, "usernameFragment": "cp3x"}
    assert (True, {**flat, "candidate": blanked}) == scrub_signal("webrtc_candidate", flat)
    nested = {"candidate": {"candidate": relay, "sdpMid": "0"}, "to": "bob"}
    expected = {"candidate": {"candidate": blanked, "sdpMid": "0"}, "to": "bob"}
    assert (True, expected) == scrub_signal("webrtc_candidate", nested)
    unchanged = {"candidate": CHROMIUM_RELAY, "sdpMid": "0"}
    kept = scrub_signal("webrtc_candidate", unchanged)
    assert kept.keep
    assert unchanged is kept.payload  # nothing to change: the very same value is relayed
    for host in ({"candidate": CHROMIUM_HOST}, {"candidate": {"candidate": CHROMIUM_SRFLX}}):
        assert not scrub_signal("webrtc_candidate", host).keep


def test_end_of_candidates_passes() -> None:
    for payload in (
        None,
        {"candidate": ""},
        {"candidate": None},
        {"candidate": {"candidate": "", "sdpMid": "0"}},
    ):
        assert (True, payload) == scrub_signal("webrtc_candidate", payload)


def test_unreadable_or_smuggling_payloads_are_dropped() -> None:
    """Without the candidate or SDP where the server looks, or with candidate or SDP text
    anywhere else, the message is dropped whole."""
    dropped: list[tuple[str, Any]] = [
        ("webrtc_candidate", "candidate:1 1 udp 1 10.0.0.5 1 typ host"),
        ("webrtc_candidate", {}),
        ("webrtc_candidate", {"candidate": 5}),
        ("webrtc_candidate", {"candidate": ["x"]}),
        ("webrtc_candidate", {"candidate": {"sdpMid": "0"}}),
        ("webrtc_candidate", {"ice": {"candidate": CHROMIUM_HOST}}),
        ("webrtc_candidate", {"candidate": CHROMIUM_RELAY, "extra": [{"c": CHROMIUM_HOST}]}),
        ("webrtc_candidate", {"candidate": "", "note": "a=candidate:1 1 udp 1 10.0.0.5 1 typ host"}),
        ("webrtc_offer", None),
        ("webrtc_offer", {"type": "offer"}),
        ("webrtc_offer", {"description": {"type": "offer", "sdp": CHROMIUM_SDP_ALL}}),
        ("webrtc_offer", {"sdp": CHROMIUM_SDP_RELAY, "description": {"sdp": CHROMIUM_SDP_ALL}}),
        ("webrtc_answer", {"sdp": {"type": "answer"}}),
        ("webrtc_answer", {"sdp": 7}),
        ("webrtc_answer", {"sdp": "v=0", "raw": "o=- 1 2 IN IP4 10.0.0.5"}),
    ]
    for kind, payload in dropped:
        assert not scrub_signal(kind, payload).keep, (kind, payload)


def test_sdp_payload_shapes() -> None:
    """``payload.sdp`` as a string or an RTCSessionDescriptionInit; type and the rest kept."""
    scrubbed = scrub_sdp(CHROMIUM_SDP_ALL)
    offer = {"type": "offer", "sdp": CHROMIUM_SDP_ALL}
    assert (True, {"type": "offer", "sdp": scrubbed}) == scrub_signal("webrtc_offer", offer)
    answer = {"sdp": {"type": "answer", "sdp": CHROMIUM_SDP_ALL}, "n": 1}
    assert (True, {"sdp": {"type": "answer", "sdp": scrubbed}, "n": 1}) == scrub_signal(
        "webrtc_answer", answer
    )
    # hangup and anything else is not ICE: relayed as it is
    assert (True, {"reason": "next"}) == scrub_signal("hangup", {"reason": "next"})


# -- properties -----------------------------------------------------------------------------------

RELAY_ADDRESSES = st.sampled_from(["198.51.100.7", "198.51.100.8", "2001:db8:ffff::7", "turn.example.net"])
OWN = st.one_of(
    st.builds("10.{}.{}.{}".format, st.integers(0, 255), st.integers(0, 255), st.integers(1, 254)),
    st.builds("fd00::{:x}".format, st.integers(1, 0xFFFF)),
    st.uuids().map(lambda u: f"{u}.local"),
)
SPACE = st.sampled_from([" ", " ", " ", "  "])
NON_RELAY = st.sampled_from(["host", "srflx", "prflx", "HOST", "Srflx"])
EXTENSIONS = st.lists(
    st.sampled_from([("generation", "0"), ("ufrag", "cp3x"), ("network-id", "1"), ("network-cost", "999")]),
    max_size=3,
)


@st.composite
def candidates(
    draw: st.DrawFn, kind: st.SearchStrategy[str], address: st.SearchStrategy[str]
) -> tuple[str, str, str | None]:
    """(candidate, what it must become, the user's own address in it)."""
    gap = draw(SPACE)
    own = draw(OWN)
    head = [f"candidate:{draw(st.integers(0, 2**32))}", "1", draw(st.sampled_from(["udp", "tcp", "UDP"]))]
    head += [str(draw(st.integers(0, 2**31))), draw(address), str(draw(st.integers(1, 65535)))]
    typ = draw(kind)
    words = [*head, "typ", typ]
    blanked = list(words)
    if draw(st.booleans()):
        words += ["raddr", own, "rport", str(draw(st.integers(0, 65535)))]
        blanked += ["raddr", "0.0.0.0", "rport", "0"]
    for name, value in draw(EXTENSIONS):
        words += [name, value]
        blanked += [name, value]
    return gap.join(words), gap.join(blanked), own


@given(candidates(NON_RELAY, OWN))
def test_property_no_non_relay_candidate_gets_through(case: tuple[str, str, str | None]) -> None:
    candidate, _, _ = case
    assert None is scrub_candidate(candidate)
    assert None is scrub_candidate("a=" + candidate)


@given(candidates(st.sampled_from(["relay", "RELAY"]), RELAY_ADDRESSES))
def test_property_relay_candidates_change_only_in_related_address(case: tuple[str, str, str | None]) -> None:
    candidate, expected, own = case
    assert expected == scrub_candidate(candidate)
    assert own is None or own not in expected


@given(st.text(alphabet=st.sampled_from(list("candidate:typ relay host srflx 0.1\r\n\ta=")), max_size=80))
@example("candidate:1 1 udp 1 10.0.0.5 1 typ relay\ra=candidate:1 1 udp 1 10.0.0.5 1 typ host")
def test_property_whatever_text_kept_is_one_relay_candidate(text: str) -> None:
    """Whatever the text, what is kept is empty or a single relay candidate, on one line."""
    kept = scrub_candidate(text)
    if kept is None or kept == "":
        return
    words = kept.split()
    assert "\r" not in kept and "\n" not in kept
    assert ["typ", "relay"] == [w.lower() for w in words[6:8]]
    assert 1 == [w.lower() for w in words].count("typ")


LINE_ENDINGS = st.sampled_from(["\r\n", "\n", "\r\n", "\r"])
PLAIN_LINES = st.sampled_from(
    [
        "v=0",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "a=ice-ufrag:cp3x",
        "a=ice-pwd:9bQV1wT3oTuL4emLEvvkpTjx",
        "a=rtcp-mux",
        "a=rtcp:9",
        "a=end-of-candidates",
        "a=mid:0",
        "c=IN IP4 0.0.0.0",
        "o=- 42 2 IN IP4 127.0.0.1",
        "a=rtcp:9 IN IP4 0.0.0.0",
    ]
)


@st.composite
def sdp_lines(draw: st.DrawFn) -> tuple[str, str, set[str]]:
    """(line, what it must become, the user's own addresses in it) for one SDP line."""
    choice = draw(st.integers(0, 4))
    if choice == 0:
        line = draw(PLAIN_LINES)
        return line, line, set()
    if choice == 1:
        candidate, _, own = draw(candidates(NON_RELAY, OWN))
        address = candidate.split()[4]
        return "a=" + candidate, "", {address} | ({own} if own else set())
    if choice == 2:
        candidate, blanked, own = draw(candidates(st.just("relay"), RELAY_ADDRESSES))
        return "a=" + candidate, "a=" + blanked, {own} if own else set()
    own = draw(OWN)
    six = ":" in own
    blank = "::" if six else "0.0.0.0"
    family = "IP6" if six else "IP4"
    if choice == 3:
        return f"c=IN {family} {own}", f"c=IN {family} {blank}", {own}
    return f"a=rtcp:9 IN {family} {own}", f"a=rtcp:9 IN {family} {blank}", {own}


@given(st.lists(st.tuples(sdp_lines(), LINE_ENDINGS), max_size=25))
def test_property_sdp_keeps_no_own_address_and_the_rest_byte_for_byte(
    lines: list[tuple[tuple[str, str, set[str]], str]],
) -> None:
    sdp = "".join(line + ending for (line, _, _), ending in lines)
    expected = "".join(kept + ending for (_, kept, _), ending in lines if kept)
    scrubbed = scrub_sdp(sdp)
    assert expected == scrubbed
    for (_, _, own), _ in lines:
        for address in own:
            assert address not in scrubbed
    for line in lines_of(scrubbed):
        if is_candidate_line(line):
            assert "relay" == line.split()[7].lower()


@given(
    st.text(alphabet=st.sampled_from(list("a=candidate:1 typ relay host 10.0.5\r\nc=IN IP4\t")), max_size=200)
)
def test_property_any_text_leaves_no_non_relay_candidate_line(sdp: str) -> None:
    """Any text at all: every line (split at every CR and LF) that could be read as a
    candidate is a relay candidate, and scrubbing again changes nothing."""
    scrubbed = scrub_sdp(sdp)
    for line in lines_of(scrubbed):
        if is_candidate_line(line):
            words = [w.lower() for w in line.split(" ") if w]
            assert ["typ", "relay"] == words[6:8]
            assert 1 == words.count("typ")
    assert scrubbed == scrub_sdp(scrubbed)


def test_blank_values_are_what_the_protocol_names() -> None:
    assert ("0.0.0.0", "0") == (privacy.BLANK_ADDRESS, privacy.BLANK_PORT)
