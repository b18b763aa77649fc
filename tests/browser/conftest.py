"""Browser fixtures: the real server in a subprocess, and Debian's Chromium through Playwright.

How this works: Playwright's sync API runs its own event loop and must not share a thread
with trio, so these tests are plain sync tests and the server is a real ``aleatoria serve``
subprocess on port 0 (its log line tells us the port). The browser is the system Chromium
(``scripts/install-browser.sh`` installs it and the ``playwright`` package); Playwright never
downloads one. Where no browser can be installed the tests skip and say why — unless
``ALEATORIA_REQUIRE_BROWSER=1``, which turns that skip into a failure for CI machines that
must run them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, ViewportSize

REPO = Path(__file__).resolve().parents[2]
DESKTOP: ViewportSize = {"width": 1280, "height": 800}

# The network here is closed and we run as root: no sandbox, no background fetches, no QUIC.
# Fake media devices stand in for a camera and microphone and auto-accept the permission.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    # Chromium may hide host candidates behind mDNS names nobody here can resolve.
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]

_BROWSER_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
_LISTENING = re.compile(r"listening on ws://(?P<where>[^/\s]+)/ws")
_START_TIMEOUT = 20.0


def _unavailable(reason: str) -> None:
    hint = " Run scripts/install-browser.sh to install it."
    if os.environ.get("ALEATORIA_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + hint + " (ALEATORIA_REQUIRE_BROWSER=1, so this is a failure.)")
    pytest.skip(reason + hint)


def find_browser() -> str | None:
    """The system Chromium: ``ALEATORIA_CHROMIUM`` if set, else the usual Debian paths."""
    configured = os.environ.get("ALEATORIA_CHROMIUM")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    for path in _BROWSER_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the whole session; each page gets its own context."""
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _unavailable("The 'playwright' Python package is not installed.")
    executable = find_browser()
    if executable is None:
        _unavailable("No Chromium found (looked for /usr/bin/chromium and $ALEATORIA_CHROMIUM).")
    assert executable is not None
    with sync_playwright() as playwright:
        expect.set_options(timeout=10_000)  # the default 5 s is tight on a loaded CI machine
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


class ServerProcess:
    """``python -m aleatoria serve --port N`` with its log collected in the background."""

    def __init__(self, port: int = 0, settings: dict[str, str] | None = None) -> None:
        env = dict(os.environ, ALEATORIA_LOG_LEVEL="INFO")
        # Only the in-memory store: a developer's Redis settings must not leak into the test.
        for name in ("ALEATORIA_REDIS_URL", "VALKEY_HOST", "ALEATORIA_AUTH_SECRET", "ALEATORIA_ADMIN_TOKEN"):
            env.pop(name, None)
        env.update(settings or {})  # a test's own settings (e.g. ICE servers, an admin token)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aleatoria", "serve", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._found = threading.Event()
        self.where = ""
        # Drain the pipe for the whole run, or a chatty server would block on a full pipe.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            match = _LISTENING.search(line)
            if match and not self._found.is_set():
                self.where = match["where"]
                self._found.set()
        self._found.set()  # the process ended; wait_ready reports it

    def wait_ready(self) -> str:
        if not self._found.wait(_START_TIMEOUT) or not self.where:
            self.stop()
            log = "\n".join(self.lines[-40:])
            raise RuntimeError(f"the server did not report its port; its output:\n{log}")
        return f"http://{self.where}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="session")
def server_url(browser: Browser) -> Iterator[str]:
    """Base URL of a real server (in-memory store) serving the page at ``/``.

    Depends on ``browser`` so that a missing browser skips before a server is started.
    """
    server = ServerProcess()
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture
def start_server(browser: Browser) -> Iterator[Callable[[dict[str, str]], str]]:
    """``start_server(settings)``: the base URL of a server of its own started with these
    extra environment settings (e.g. ICE servers); stopped after the test."""
    servers: list[ServerProcess] = []

    def _start(settings: dict[str, str]) -> str:
        servers.append(ServerProcess(settings=settings))
        return servers[-1].wait_ready()

    yield _start
    for server in servers:
        server.stop()


MODERATION_TOKEN = "browser-test-operator-token"


@pytest.fixture(scope="session")
def moderated_server_url(browser: Browser) -> Iterator[tuple[str, str]]:
    """Base URL and operator token of a server with the /admin API on (docs/moderation.md)."""
    server = ServerProcess(settings={"ALEATORIA_ADMIN_TOKEN": MODERATION_TOKEN})
    try:
        yield server.wait_ready(), MODERATION_TOKEN
    finally:
        server.stop()


class RestartableServer:
    """A server of its own on a fixed port, which a test may stop and start again."""

    def __init__(self) -> None:
        self.port = free_port()
        self._process: ServerProcess | None = None
        self.url = self.start()

    def start(self) -> str:
        self._process = ServerProcess(self.port)
        return self._process.wait_ready()

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None


@pytest.fixture
def restartable_server(browser: Browser) -> Iterator[RestartableServer]:
    server = RestartableServer()
    try:
        yield server
    finally:
        server.stop()


class PageErrors:
    """Uncaught page exceptions, which every test asserts are absent."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def watch(self, page: Page) -> None:
        page.on("pageerror", lambda exc: self.errors.append(f"{page.url}: {exc}"))


def free_port() -> int:
    """A port nobody listens on right now (for a server that must come back on the same one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def open_page(browser: Browser, server_url: str) -> Iterator[Callable[..., Page]]:
    """Open the demo page in a fresh browser context (its own storage, like another person).

    ``base`` points a page at another server than the session's one.
    """
    contexts: list[Any] = []
    errors = PageErrors()

    def _open(viewport: ViewportSize | None = None, base: str | None = None) -> Page:
        context = browser.new_context(viewport=viewport or DESKTOP)
        context.set_default_timeout(15_000)
        contexts.append(context)
        page = context.new_page()
        errors.watch(page)
        page.goto((base or server_url) + "/")
        return page

    yield _open
    for context in contexts:
        context.close()
    assert [] == errors.errors
