"""The report webhook (``ALEATORIA_REPORT_WEBHOOK``, PROTOCOL.md section 13) with a real HTTP
receiver on loopback: reports filed over WebSocket arrive signed; a receiver that is down,
failing or hanging gets every report later, in order, and never slows the chat; a full queue
drops the oldest and counts it.

The receiver is a small trio HTTP server (h11) in this process, like the server under test;
"killing" it closes its listening socket and every connection it holds.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio
from adminapi import TOKEN
from rawws import http_get
from support import Peer, RunningServer, connect, running_server

pytestmark = pytest.mark.loopback  # a real HTTP receiver over TCP

DOCS = Path(__file__).resolve().parents[1] / "docs" / "moderation.md"


def documented_verify() -> Callable[[bytes, str, str], bool]:
    """The ``verify`` function docs/moderation.md gives receivers, run as written there."""
    text = DOCS.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    source = next(block for block in blocks if "def verify(" in block)
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    verify: Callable[[bytes, str, str], bool] = namespace["verify"]
    return verify


@attrs.define
class Post:
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def report(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


class Receiver:
    """An HTTP receiver that records every POST it reads whole. ``fail`` answers the next N
    with 500; ``hang`` holds every request until ``release``; ``kill`` closes its sockets,
    ``start`` opens them again on the same port."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.port = 0
        self.posts: list[Post] = []
        self.fail = 0
        self.answered_500 = 0
        self.hang = False
        self.drip = False  # answer 200 with a body of a byte a second, never ending
        self.released = trio.Event()
        self._changed = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._closed = trio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        self._scope = trio.CancelScope()
        self._closed = trio.Event()
        self._nursery.start_soon(self._serve, listeners, self._scope)

    async def _serve(self, listeners: list[trio.SocketListener], scope: trio.CancelScope) -> None:
        try:
            with scope:
                await trio.serve_listeners(self._handle, listeners)
        finally:
            for listener in listeners:
                listener.socket.close()
            self._closed.set()

    async def kill(self) -> None:
        """Close the listening socket and every connection; return once they are closed."""
        assert self._scope is not None
        self._scope.cancel()
        await self._closed.wait()

    def release(self) -> None:
        self.hang = False
        self.released.set()

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return
        assert request is not None
        headers = {name.decode(): value.decode() for name, value in request.headers}
        self.posts.append(Post(request.target.decode(), headers, body))
        self._wake()
        if self.hang:
            await self.released.wait()
        if self.drip:
            head = conn.send(h11.Response(status_code=200, headers=[("content-length", str(10**9))]))
            await stream.send_all(head or b"")
            while True:
                await stream.send_all(b"x")
                await trio.sleep(1)  # the slow answer under test
        status = 200
        if self.fail:
            self.fail -= 1
            self.answered_500 += 1
            status = 500
        out = conn.send(
            h11.Response(status_code=status, headers=[("content-length", "0"), ("connection", "close")])
        )
        await stream.send_all((out or b"") + (conn.send(h11.EndOfMessage()) or b""))

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def ids(self) -> list[str]:
        """Report ids in the order they first arrived (a retry may bring one twice)."""
        return list(dict.fromkeys(post.report["id"] for post in self.posts))

    async def wait_for(self, ready: Callable[[], bool], timeout: float = 20.0) -> None:
        with trio.fail_after(timeout):
            while not ready():
                await self._changed.wait()


@asynccontextmanager
async def receiver_and_server(**overrides: Any) -> AsyncIterator[tuple[Receiver, RunningServer]]:
    async with trio.open_nursery() as nursery:
        receiver = Receiver(nursery)
        await receiver.start()
        async with running_server(admin_token=TOKEN, report_webhook=receiver.url, **overrides) as srv:
            yield receiver, srv
        nursery.cancel_scope.cancel()


async def report(peer: Peer, user: str, reason: str = "spam", details: str | None = None) -> str:
    payload: dict[str, Any] = {"user": user, "reason": reason}
    if details is not None:
        payload["details"] = details
    reply = await peer.request({"type": "report_user", "payload": payload}, "report_received")
    report_id: str = reply["payload"]["reportId"]
    return report_id


async def metric(srv: RunningServer, name: str) -> float:
    text = (await http_get(srv.port, "/metrics")).body.decode()
    found = re.search(rf"^{name}(?:_total)? (\S+)$", text, re.M)
    assert found is not None, name
    return float(found[1])


async def metric_reaches(srv: RunningServer, name: str, value: float, timeout: float = 10.0) -> None:
    """Poll /metrics until ``name`` is at least ``value``."""
    with trio.fail_after(timeout):
        while True:
            if await metric(srv, name) >= value:
                return
            await trio.sleep(0.05)  # /metrics is the observable; nothing is pushed


async def test_a_receiver_that_answers_slowly_does_not_hold_the_queue() -> None:
    """A receiver that answers 200 and then drips its body, a byte a second, forever: the
    status is the answer (the body is never read), so every report is delivered. Before,
    httpx's per-read timeout never fired and the first report held the queue for good."""
    async with receiver_and_server() as (receiver, srv):
        receiver.drip = True
        async with connect(srv, "alice") as alice:
            for user in ("bob", "carol", "dave"):
                await report(alice, user)
        await metric_reaches(srv, "aleatoria_webhook_deliveries", 3)
        assert 0 == await metric(srv, "aleatoria_webhook_failures")


async def test_a_report_arrives_signed() -> None:
    """A report filed over WebSocket is POSTed as JSON with the report's id, a signature that
    verifies as docs/moderation.md says, and the fields an operator needs."""
    verify = documented_verify()
    async with receiver_and_server() as (receiver, srv):
        async with connect(srv, "alice") as alice, connect(srv, "bob") as bob:
            dm = {"type": "chat_message", "toUser": "alice", "payload": {"content": "you again"}}
            await bob.request(dm, "chat_message")
            await alice.expect("chat_message")
            report_id = await report(alice, "bob", "harassment", "keeps writing")
        await receiver.wait_for(lambda: len(receiver.posts) >= 1)
        post = receiver.posts[0]
        assert "/hook" == post.target
        assert post.headers["content-type"] == "application/json"
        assert report_id == post.headers["x-aleatoria-report-id"]
        assert verify(post.body, post.headers["x-aleatoria-signature"], TOKEN)
        assert not verify(post.body, post.headers["x-aleatoria-signature"], "another-token")
        assert not verify(post.body + b" ", post.headers["x-aleatoria-signature"], TOKEN)
        sent = post.report
        assert {
            "id": report_id,
            "reporter": "alice",
            "reported": "bob",
            "reason": "harassment",
            "details": "keeps writing",
        } == {key: sent[key] for key in ("id", "reporter", "reported", "reason", "details")}
        assert ["you again"] == [m["payload"]["content"] for m in sent["evidence"]["directMessages"]]
        assert {
            "id",
            "reporter",
            "reported",
            "reason",
            "details",
            "time",
            "match",
            "instance",
            "evidence",
        } == set(sent)
        assert 1 == await metric(srv, "aleatoria_webhook_deliveries")
        assert 0 == await metric(srv, "aleatoria_webhook_failures")


async def test_a_receiver_killed_and_restarted_loses_no_report() -> None:
    """Reports filed while the receiver is down (its socket closed) arrive once it is back
    on the same port, in the order they were filed."""
    async with receiver_and_server() as (receiver, srv):
        async with connect(srv, "alice") as alice:
            first = await report(alice, "u1")
            await receiver.wait_for(lambda: [first] == receiver.ids())
            await receiver.kill()
            filed = [await report(alice, f"u{n}") for n in range(2, 6)]
            # Down: the first of them fails at least once (connection refused).
            await metric_reaches(srv, "aleatoria_webhook_failures", 1)
            await receiver.start()
            await receiver.wait_for(lambda: len(receiver.ids()) == 5)
        assert [first, *filed] == receiver.ids()
        assert 5 == await metric(srv, "aleatoria_webhook_deliveries")


async def test_a_failing_receiver_is_retried() -> None:
    """A receiver answering 500 gets the same report again (same body, same signature) until
    it answers 2xx; each failure counts."""
    async with receiver_and_server() as (receiver, srv):
        receiver.fail = 2
        async with connect(srv, "alice") as alice:
            report_id = await report(alice, "bob")
        await receiver.wait_for(lambda: len(receiver.posts) == 3)
        assert [report_id] * 3 == [post.report["id"] for post in receiver.posts]
        assert 1 == len({(post.body, post.headers["x-aleatoria-signature"]) for post in receiver.posts})
        await metric_reaches(srv, "aleatoria_webhook_deliveries", 1)
        assert 2 == await metric(srv, "aleatoria_webhook_failures")


async def test_a_hanging_receiver_never_delays_chat() -> None:
    """While the receiver holds its requests, reports pile up and a calm client's DM round
    trips stay fast; once it answers, every report arrives."""
    async with receiver_and_server() as (receiver, srv):
        receiver.hang = True
        async with (
            connect(srv, "alice") as alice,
            connect(srv, "calm") as calm,
            connect(srv, "friend") as friend,
        ):
            filed = [await report(alice, f"troll{n}") for n in range(5)]
            await receiver.wait_for(lambda: len(receiver.posts) == 1)  # the first is held
            slowest = 0.0
            for n in range(20):
                started = time.monotonic()
                dm = {"type": "chat_message", "toUser": "friend", "payload": {"content": f"hi {n}"}}
                await calm.request(dm, "chat_message")
                await friend.expect("chat_message")
                slowest = max(slowest, time.monotonic() - started)
                filed.append(await report(alice, f"more{n}"))
            assert slowest < 1.0, slowest
            assert 1 == len(receiver.posts)  # still held
            receiver.release()
            await receiver.wait_for(lambda: len(receiver.ids()) == len(filed))
        assert filed == receiver.ids()


async def test_a_full_queue_drops_the_oldest_and_counts_it() -> None:
    """With ALEATORIA_WEBHOOK_QUEUE=3 and the receiver down, five reports leave the one being
    retried and the newest two (the oldest waiting go); the two dropped are counted in
    /metrics."""
    async with receiver_and_server(webhook_queue=3) as (receiver, srv):
        await receiver.kill()
        async with connect(srv, "alice") as alice:
            filed = [await report(alice, f"u{n}") for n in range(5)]
        assert 2 == await metric(srv, "aleatoria_webhook_dropped")
        await receiver.start()
        await receiver.wait_for(lambda: len(receiver.ids()) == 3)
        assert [filed[0], *filed[3:]] == receiver.ids()
