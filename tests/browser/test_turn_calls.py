"""Calls through a real coturn with the credentials Aleatoria issued, in privacy mode
(PROTOCOL.md section 14, docs/turn.md): two Chromium pages of the demo get iceServers and
iceTransportPolicy "relay" from the server, connect through TURN (getStats shows a relay
candidate pair, the page says "relayed"), and nothing the peer receives — from the honest
page, or from a modified one sending Chromium's real host candidates and SDP and hand-made
hostile ones — names an address that is not a relay candidate's.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("ALEATORIA_REQUIRE_BROWSER") != "1":
    pytest.importorskip(
        "playwright.sync_api",
        reason="the 'playwright' package is not installed; run scripts/install-browser.sh",
    )

from playwright.sync_api import Page, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from turn_server import TurnServer, started, turnserver_binary

from aleatoria.privacy import is_candidate_line

__all__ = ["turnserver_binary"]  # a fixture, used by name

OpenPage = Callable[..., Page]

SECRET = "browser-turn-s3cret"
CALL_TIMEOUT_MS = 30_000
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"

# Runs before the page's own script: records every frame the page's WebSocket sends and
# receives, as the page itself sees them.
RECORD_FRAMES = """
window.__sent = []; window.__received = [];
const NativeWebSocket = window.WebSocket;
window.WebSocket = class extends NativeWebSocket {
  constructor(...args) {
    super(...args);
    this.addEventListener('message', (event) => window.__received.push(String(event.data)));
  }
  send(data) { window.__sent.push(String(data)); return super.send(data); }
};
"""

# A modified client: gathers real candidates with no ICE servers and policy "all" (host
# addresses, IPv4 and IPv6) and returns them with the SDP that lists them.
GATHER_REAL_CANDIDATES = """async () => {
  const pc = new RTCPeerConnection({ iceServers: [], iceTransportPolicy: 'all' });
  const candidates = [];
  pc.onicecandidate = (event) => { if (event.candidate) candidates.push(event.candidate.toJSON()); };
  pc.createDataChannel('probe');
  await pc.setLocalDescription();
  await new Promise((resolve) => {
    if (pc.iceGatheringState === 'complete') resolve();
    pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === 'complete') resolve(); };
  });
  const sdp = pc.localDescription.sdp;
  pc.close();
  return { candidates, sdp };
}"""


@pytest.fixture(scope="module")
def coturn(turnserver_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TurnServer]:
    with started(turnserver_binary, tmp_path_factory.mktemp("coturn"), (SECRET,)) as server:
        yield server


@pytest.fixture
def private_server(start_server: Callable[[dict[str, str]], str], coturn: TurnServer) -> str:
    """A real server in privacy mode whose ICE server is the test's coturn."""
    return start_server(
        {"ALEATORIA_ICE_URLS": coturn.url, "ALEATORIA_TURN_SECRET": SECRET, "ALEATORIA_RELAY_ONLY": "1"}
    )


def open_recorded(open_page: OpenPage, base: str) -> Page:
    """The demo page on ``base``, recording its WebSocket frames from the first one."""
    page = open_page(base=base)
    page.add_init_script(RECORD_FRAMES)
    page.reload()
    return page


def sign_in(page: Page, name: str) -> None:
    page.fill("#name-input", name)
    page.click("#signin-form button[type=submit]")
    expect(page.locator("body")).to_have_attribute("data-conn", "online")


def wait_connected(page: Page, peer: str, other: Page) -> None:
    try:
        page.wait_for_function(
            """peer => window.aleatoria.peerId === peer && window.aleatoria.pc !== null
                && window.aleatoria.pc.connectionState === 'connected'
                && window.aleatoria.remoteFrames >= 10""",
            arg=peer,
            timeout=CALL_TIMEOUT_MS,
        )
    except PlaywrightTimeoutError:
        traces = [p.evaluate("window.aleatoria.state.call.trace.join('\\n')") for p in (page, other)]
        raise AssertionError(f"no call with {peer}:\n" + "\n\n".join(traces)) from None


def received_signals(page: Page) -> list[dict[str, Any]]:
    frames: list[str] = page.evaluate("window.__received")
    messages = [json.loads(frame) for frame in frames]
    return [m for m in messages if m.get("type") in ("webrtc_offer", "webrtc_answer", "webrtc_candidate")]


def sent_signals(page: Page) -> list[dict[str, Any]]:
    messages = [json.loads(frame) for frame in page.evaluate("window.__sent")]
    return [m for m in messages if m.get("type") in ("webrtc_offer", "webrtc_answer", "webrtc_candidate")]


def candidate_of(payload: Any) -> str | None:
    value = payload.get("candidate") if isinstance(payload, dict) else None
    return value.get("candidate") if isinstance(value, dict) else value


def sdp_of(payload: Any) -> str | None:
    value = payload.get("sdp") if isinstance(payload, dict) else None
    return value.get("sdp") if isinstance(value, dict) else value


def assert_only_relay(signals: list[dict[str, Any]], own: set[str]) -> None:
    """Every candidate is a relay one with a blank related address, every SDP candidate line
    too, and none of ``own`` (the machine's addresses) appears anywhere."""
    for message in signals:
        text = json.dumps(message)
        for address in own:
            assert address not in text, message
        candidate = candidate_of(message["payload"])
        if candidate:
            words = candidate.split()
            assert ["typ", "relay"] == words[6:8], candidate
            if "raddr" in words:
                assert "0.0.0.0" == words[words.index("raddr") + 1], candidate
        for line in re.split(r"\r\n|\r|\n", sdp_of(message["payload"]) or ""):
            if is_candidate_line(line):
                assert ["typ", "relay"] == line.split()[6:8], line


def send_raw(page: Page, messages: list[dict[str, Any]]) -> None:
    """Send through the page's own socket, as a modified client would."""
    page.evaluate(
        "(ms) => { for (const m of ms) window.aleatoria.state.conn.ws.send(JSON.stringify(m)); }", messages
    )


def hostile_candidates(real: list[dict[str, Any]]) -> list[Any]:
    """Payloads of webrtc_candidate a modified client might send: Chromium's real ones in both
    shapes, and hand-made ones (srflx, prflx, IPv6, mDNS, odd spacing, smuggled lines)."""
    payloads: list[Any] = []
    for candidate in real:
        payloads += [candidate, {"candidate": candidate, "kind": "nested"}]
    for text in (
        "candidate:1 1 udp 1686052607 203.0.113.9 61000 typ srflx raddr 10.9.8.7 rport 54321",
        "candidate:1 1 udp 1845501695 203.0.113.9 61001 typ prflx raddr 10.9.8.7 rport 54321",
        "candidate:1 1 udp 2122260223 2001:db8::9:8:7 54321 typ host generation 0",
        "candidate:1 1 udp 2122260223 0f1e2d3c-aaaa-bbbb-cccc-0123456789ab.local 54321 typ host",
        "candidate:1  1  UDP  2122260223  10.9.8.7  54321  TYP  HOST",
        "candidate:1 1 udp 1 198.51.100.9 3478 typ relay\r\na=candidate:2 1 udp 1 10.9.8.7 9 typ host",
        "candidate:1 1 udp 1 198.51.100.9 3478 typ host typ relay",
    ):
        payloads += [{"candidate": text, "sdpMid": "0", "sdpMLineIndex": 0}]
    return payloads


def test_relay_only_call_through_coturn_and_no_address_reaches_the_peer(
    open_page: OpenPage, private_server: str, coturn: TurnServer
) -> None:
    ivan = open_recorded(open_page, private_server)
    sign_in(ivan, "ivan")
    jade = open_recorded(open_page, private_server)
    sign_in(jade, "jade")

    jade.click("#call-start")
    expect(jade.locator("body")).to_have_attribute("data-call-state", "waiting")
    ivan.click("#call-start")
    wait_connected(ivan, "jade", jade)
    wait_connected(jade, "ivan", ivan)

    # The server's TURN credentials, for each user, were what the pages used with coturn.
    for page, user in ((ivan, "ivan"), (jade, "jade")):
        role = next(
            m for m in map(json.loads, page.evaluate("window.__received")) if m["type"] == "assign_role"
        )
        assert "relay" == role["payload"]["iceTransportPolicy"]
        (turn,) = role["payload"]["iceServers"]
        assert [coturn.url] == turn["urls"]
        assert user == turn["username"].split(":")[1]
        assert coturn.allocations(turn["username"]), "\n".join(coturn.lines[-30:])
        # getStats: both ends of the selected pair are relay candidates; the page says so.
        assert {"local": "relay", "remote": "relay"} == page.evaluate("window.aleatoria.selectedPair()")
        expect(page.locator("body")).to_have_attribute("data-call-path", "relay")
        expect(page.locator("#call-path")).to_contain_text("Relayed through the TURN server")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    jade.screenshot(path=str(ARTIFACTS / "call-relayed.png"))

    # Fresh credentials (as the page asks before an ICE restart) go into the live connection.
    ivan.evaluate("window.aleatoria.state.conn.ws.send(JSON.stringify({type: 'get_ice_servers'}))")
    ivan.wait_for_function(
        """() => {
            const replies = window.__received.map(JSON.parse).filter((m) => m.type === 'ice_servers');
            const given = replies.length && replies[replies.length - 1].payload.iceServers;
            const used = window.aleatoria.pc.getConfiguration().iceServers;
            return given && used.length === 1 && used[0].username === given[0].username
                && used[0].credential === given[0].credential;
        }"""
    )
    assert "connected" == ivan.evaluate("window.aleatoria.pc.connectionState")

    # The machine's own addresses, as Chromium finds them (IPv4 and IPv6 here).
    real = ivan.evaluate(GATHER_REAL_CANDIDATES)
    own = {candidate["candidate"].split()[4] for candidate in real["candidates"]}
    assert own, real

    # What the honest pages sent and received: relay only (Chromium obeyed the policy).
    assert_only_relay(received_signals(jade), own)
    assert_only_relay(received_signals(ivan), own)
    honest = len(received_signals(jade))

    # ivan turns hostile: real host candidates and SDP, and hand-made ones, in both shapes.
    offers = [
        {"type": "offer", "sdp": real["sdp"]},
        {"sdp": {"type": "offer", "sdp": real["sdp"].replace("\r\n", "\n")}},
    ]
    sent = [
        {"type": "webrtc_candidate", "toUser": "jade", "payload": p}
        for p in hostile_candidates(real["candidates"])
    ]
    sent += [{"type": "webrtc_offer", "toUser": "jade", "payload": p} for p in offers]
    marker = "candidate:7 1 udp 1 198.51.100.9 3478 typ relay raddr 10.9.8.7 rport 1"
    sent.append({"type": "webrtc_candidate", "toUser": "jade", "payload": {"candidate": marker}})
    send_raw(ivan, sent)
    # Frames keep their order on one socket: once the marker is in, everything before it is.
    jade.wait_for_function(
        "() => window.__received.some((f) => f.includes('candidate:7 1 udp 1 198.51.100.9'))",
        timeout=15_000,
    )
    late = received_signals(jade)[honest:]
    assert_only_relay(late, own | {"10.9.8.7", "2001:db8::9:8:7", ".local", "203.0.113.9"})
    # Two offers (their SDP scrubbed) and the marker, its raddr blanked: nothing else.
    assert ["webrtc_offer", "webrtc_offer", "webrtc_candidate"] == [m["type"] for m in late]
    assert marker.replace("raddr 10.9.8.7 rport 1", "raddr 0.0.0.0 rport 0") == candidate_of(
        late[-1]["payload"]
    )
    for message in late[:2]:
        sdp = sdp_of(message["payload"])
        assert sdp and sdp.startswith("v=0") and "a=candidate" not in sdp
    # ivan did send what was stopped: host candidates with his own addresses.
    assert any(address in json.dumps(sent_signals(ivan)) for address in own)
