"""The report webhook (``ALEATORIA_REPORT_WEBHOOK``, PROTOCOL.md section 13).

How this works. A stored report is handed to ``Webhook.submit``, which never blocks: it goes
in a bounded queue (the oldest waiting report is dropped, and counted, when it is full) and
one task, ``run``, POSTs the queue's head until the receiver answers 2xx, then the next.
A failed attempt (refused connection, timeout, any other status) is retried with
exponential backoff (``BACKOFF_FIRST`` doubling up to ``BACKOFF_MAX``), so a receiver that
is down for a while gets every report once it is back, in order; the chat never waits on it.
Delivery is at least once: a receiver that times out after storing gets the report again
(its ``id`` tells the copies apart).

Each POST's body is the report's JSON (with its ``id``); ``X-Aleatoria-Signature`` is
``sha256=`` and the hex HMAC-SHA256 of the body keyed with the admin token, and
``X-Aleatoria-Report-Id`` names the report.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import deque
from typing import Any

import httpx
import orjson
import trio

from aleatoria.metrics import Stats

log = logging.getLogger("aleatoria.webhook")

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
TIMEOUT = 5.0
SIGNATURE_HEADER = "X-Aleatoria-Signature"


def signature(secret: str, body: bytes) -> str:
    """The signature header's value for ``body`` (how a receiver checks it, too)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Webhook:
    def __init__(self, url: str, secret: str, stats: Stats, *, capacity: int = 1000) -> None:
        self.url = url
        self._secret = secret
        self._stats = stats
        self._queue: deque[tuple[str, bytes]] = deque()
        self._capacity = capacity
        self._wakeup = trio.Event()
        self._sending: str | None = None  # the report being posted (never dropped)
        self.dropped = 0

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def submit(self, report_id: str, report: dict[str, Any]) -> None:
        """Queue ``report`` for delivery (never blocks)."""
        if len(self._queue) >= self._capacity:
            # The oldest waiting report goes; not the one being posted (it may arrive).
            index = 1 if self._sending is not None and len(self._queue) > 1 else 0
            old_id, _ = self._queue[index]
            del self._queue[index]
            self.dropped += 1
            self._stats.webhook_dropped += 1
            log.warning("event=webhook_dropped id=%s reason=queue_full capacity=%d", old_id, self._capacity)
        self._queue.append((report_id, orjson.dumps({**report, "id": report_id})))
        self._wakeup.set()

    async def run(self) -> None:
        """Deliver forever (until cancelled)."""
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            while True:
                if not self._queue:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                    continue
                report_id, body = self._queue[0]
                self._sending = report_id
                try:
                    await self._deliver(client, report_id, body)
                finally:
                    self._sending = None
                if self._queue and self._queue[0][0] == report_id:
                    self._queue.popleft()

    async def _deliver(self, client: httpx.AsyncClient, report_id: str, body: bytes) -> None:
        headers = {
            "content-type": "application/json",
            "accept-encoding": "identity",
            SIGNATURE_HEADER: signature(self._secret, body),
            "X-Aleatoria-Report-Id": report_id,
        }
        delay = BACKOFF_FIRST
        attempt = 0
        while True:
            attempt += 1
            problem = "timeout"
            # The whole attempt within TIMEOUT (httpx's own timeout bounds each read, so a
            # receiver sending a byte every few seconds held the queue forever), and the
            # answer's body never read: only its status counts, and a receiver's body (a
            # 1 MB gzip of 1 GiB, decompressed on the loop) once took the server to 2 GB.
            with trio.move_on_after(TIMEOUT):
                try:
                    async with client.stream("POST", self.url, content=body, headers=headers) as response:
                        status = response.status_code
                    if 200 <= status < 300:
                        self._stats.webhook_deliveries += 1
                        log.info("event=webhook_delivered id=%s attempts=%d", report_id, attempt)
                        return
                    problem = f"status {status}"
                except httpx.HTTPError as exc:
                    problem = type(exc).__name__
            self._stats.webhook_failures += 1
            log.warning(
                "event=webhook_failed id=%s attempt=%d problem=%s retry_in=%.1f",
                report_id,
                attempt,
                problem,
                delay,
            )
            await trio.sleep(delay)
            delay = min(BACKOFF_MAX, delay * 2)
            if not self._queue or self._queue[0][0] != report_id:
                return  # dropped meanwhile (queue full): go on with the next
