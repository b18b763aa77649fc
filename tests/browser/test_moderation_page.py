"""The demo page's safety controls (PROTOCOL.md section 13) in a real Chromium against a real
server with the operator API on: Report and Block on a call and on a DM, the list of blocked
people, and the screen a banned user sees."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

if os.environ.get("ALEATORIA_REQUIRE_BROWSER") != "1":
    pytest.importorskip(
        "playwright.sync_api",
        reason="the 'playwright' package is not installed; run scripts/install-browser.sh",
    )

import httpx
from playwright.sync_api import Locator, Page, expect

OpenPage = Callable[..., Page]
CALL_TIMEOUT_MS = 30_000


# The same small steps as test_web_client.py's (test modules do not import each other).
def sign_in(page: Page, name: str) -> None:
    page.fill("#name-input", name)
    page.click("#signin-form button[type=submit]")
    expect(page.locator("body")).to_have_attribute("data-conn", "online")


def say(page: Page, text: str) -> None:
    page.fill("#composer-input", text)
    page.press("#composer-input", "Enter")


def bodies(page: Page) -> Locator:
    return page.locator("#messages .msg .body")


class Operator:
    """The /admin API of the ``moderated_server_url`` server."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self._headers = {"authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = httpx.request(method, self.url + path, headers=self._headers, json=body, timeout=10)
        assert response.status_code < 300, response.text
        return response.json()


@pytest.fixture
def operator(moderated_server_url: tuple[str, str]) -> Operator:
    return Operator(*moderated_server_url)


def open_on(open_page: OpenPage, operator: Operator, name: str) -> Page:
    page = open_page(base=operator.url)
    sign_in(page, name)
    return page


def in_a_call(first: Page, second: Page) -> None:
    """``first`` waits, ``second`` asks: both reach a connected call."""
    first.click("#call-start")
    expect(first.locator("body")).to_have_attribute("data-call-state", "waiting")
    second.click("#call-start")
    for page in (first, second):
        expect(page.locator("body")).to_have_attribute(
            "data-call-state", "connected", timeout=CALL_TIMEOUT_MS
        )


def test_report_in_a_call_ends_it_and_reaches_the_moderators(open_page: OpenPage, operator: Operator) -> None:
    """Report (harassment) during a call: the other side is told its partner left, the
    reporter leaves the call, the report is in GET /admin/reports, and the reported user is
    in the reporter's blocked list (unblock works)."""
    rita = open_on(open_page, operator, "rita")
    sam = open_on(open_page, operator, "sam")
    in_a_call(rita, sam)
    expect(rita.locator("#call-safety")).to_be_visible()

    rita.click("#call-report")
    dialog = rita.locator("#report-dialog")
    expect(dialog).to_be_visible()
    expect(rita.locator("#report-title")).to_have_text("Report sam")
    rita.select_option("#report-reason", "harassment")
    rita.fill("#report-details", "rude gestures on camera")
    rita.click("#report-send")
    expect(dialog).to_be_hidden()

    expect(sam.locator("body")).to_have_attribute("data-call-state", "peer_left")
    expect(sam.locator("#call-status")).to_contain_text("rita left the call")
    expect(rita.locator("body")).to_have_attribute("data-call-state", "peer_left")
    expect(rita.locator("#call-status")).to_contain_text("You reported sam")
    expect(rita.locator("#banner")).to_contain_text("Your report about sam was sent")
    expect(rita.locator("#call-safety")).to_be_hidden()  # done with sam

    reports = operator.call("GET", "/admin/reports?user=sam")["reports"]
    assert [("rita", "sam", "harassment", "rude gestures on camera")] == [
        (r["reporter"], r["reported"], r["reason"], r["details"]) for r in reports
    ]
    assert {"peer": "sam", "current": True} == {k: reports[0]["match"][k] for k in ("peer", "current")}

    rita.click("#blocked-box summary")
    expect(rita.locator("#blocked-list li")).to_have_text(["samUnblock"])
    rita.click("#blocked-list button[data-unblock='sam']")
    expect(rita.locator("#blocked-list li")).to_have_count(0)
    expect(rita.locator("#blocked-empty")).to_be_visible()
    assert [] == operator.call("GET", "/admin/users/rita")["blocked"]


def test_a_report_over_the_hourly_limit_is_refused_and_the_person_blocked_all_the_same(
    open_page: OpenPage, start_server: Callable[[dict[str, str]], str]
) -> None:
    """With ALEATORIA_REPORTS_PER_HOUR=1, a second report is refused (limit_reached: nothing
    stored, nobody blocked by the server). The page says the report was not sent and blocks
    the person itself, as it promised: the call's other side is told its partner left, and
    the reported user is in the blocked list. A later confirmation names nobody wrongly."""
    base = start_server({"ALEATORIA_REPORTS_PER_HOUR": "1"})
    rita = open_page(base=base)
    sign_in(rita, "rita")
    sam = open_page(base=base)
    sign_in(sam, "sam")

    rita.fill("#dm-input", "ghost")  # the hour's one report, from a DM
    rita.click("#dm-form button[type=submit]")
    rita.click("#dm-report")
    rita.click("#report-send")
    expect(rita.locator("#banner")).to_contain_text("Your report about ghost was sent")

    in_a_call(rita, sam)
    rita.click("#call-report")
    rita.click("#report-send")
    banner = rita.locator("#banner")
    expect(banner).to_contain_text("Your report about sam was not sent")
    expect(banner).to_contain_text("too many reports")
    expect(banner).to_contain_text("sam is blocked all the same")
    expect(sam.locator("body")).to_have_attribute("data-call-state", "peer_left")
    expect(sam.locator("#call-status")).to_contain_text("rita left the call")
    rita.click("#blocked-box summary")
    expect(rita.locator("#blocked-list li span")).to_have_text(["ghost", "sam"])
    expect(banner).to_contain_text("Your report about sam was not sent")  # no "You blocked sam"


def test_report_and_block_on_a_dm(open_page: OpenPage, operator: Operator) -> None:
    """A DM conversation has Report and Block; a report carries the DMs as evidence; a block
    is confirmed and listed."""
    tina = open_on(open_page, operator, "tina")
    ugo = open_on(open_page, operator, "ugo")
    say(ugo, "hello room")
    expect(bodies(tina).last).to_have_text("hello room")
    ugo.fill("#dm-input", "tina")
    ugo.click("#dm-form button[type=submit]")
    say(ugo, "send me your number")
    tina.click("#dm-list button.open[data-name='ugo']")
    expect(bodies(tina)).to_have_text(["send me your number"])
    expect(tina.locator("#dm-safety")).to_be_visible()

    tina.click("#dm-report")
    tina.select_option("#report-reason", "spam")
    tina.click("#report-send")
    expect(tina.locator("#banner")).to_contain_text("Your report about ugo was sent")
    report = operator.call("GET", "/admin/reports?user=ugo")["reports"][0]
    assert ("tina", "spam", "") == (report["reporter"], report["reason"], report["details"])
    assert ["send me your number"] == [m["payload"]["content"] for m in report["evidence"]["directMessages"]]
    assert ["hello room"] == [m["payload"]["content"] for m in report["evidence"]["roomMessages"]]

    # Block on the other side: ugo blocks tina from his DM with her.
    expect(ugo.locator("#dm-safety")).to_be_visible()
    ugo.click("#dm-block")
    expect(ugo.locator("#banner")).to_contain_text("You blocked tina")
    ugo.click("#blocked-box summary")
    expect(ugo.locator("#blocked-list li span")).to_have_text(["tina"])
    # A room has no Report/Block bar (the buttons act on one person).
    ugo.click("#room-list button.open[data-name='Lobby']")
    expect(ugo.locator("#dm-safety")).to_be_hidden()


def test_a_banned_user_sees_the_banned_screen_and_is_not_reconnected(
    open_page: OpenPage, operator: Operator
) -> None:
    """An operator's ban closes the page's connection with 4003: "You have been banned", no
    automatic reconnection; "Try again" while banned comes back to the screen; after the
    unban it connects."""
    vera = open_on(open_page, operator, "vera")
    operator.call("POST", "/admin/bans", {"user": "vera", "reason": "test"})
    expect(vera.locator("#banned")).to_be_visible()
    expect(vera.locator("#banned-title")).to_have_text("You have been banned")
    expect(vera.locator("body")).to_have_attribute("data-conn", "banned")
    expect(vera.locator("#conn-status")).to_have_text("Banned")
    assert vera.evaluate("window.aleatoria.state.conn.retryTimer") is None  # nothing scheduled
    assert not operator.call("GET", "/admin/users/vera")["online"]

    vera.click("#banned-retry")
    expect(vera.locator("#banned-text")).to_contain_text("still refuses this name")
    expect(vera.locator("body")).to_have_attribute("data-conn", "banned")

    operator.call("DELETE", "/admin/bans/vera")
    vera.click("#banned-retry")
    expect(vera.locator("body")).to_have_attribute("data-conn", "online")
    expect(vera.locator("#banned")).to_be_hidden()
    assert operator.call("GET", "/admin/users/vera")["online"]
