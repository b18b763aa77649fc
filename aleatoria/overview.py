"""The operator's endpoints, ``/health`` and ``/metrics``, on a port of their own
(``metrics_port``), and with ``--workers`` one view of the whole process tree.

How this works. With ``--workers`` the main port is shared (SO_REUSEPORT): a request to it
reaches whichever worker the kernel picks, so a scrape there sees one worker at random. So
the parent serves ``metrics_port`` itself and asks every worker on each request: each
worker answers ``/health`` and ``/metrics`` on a private socket (``open_worker_view``: an
abstract Unix socket named by the parent's pid and the worker's index, so nothing to
configure, no file, no port), and the parent merges the answers:

- ``/metrics``: every worker's families, each sample labelled ``worker="I"`` (the index is
  stable across restarts; the instance id is not), plus the parent's own
  (``aleatoria_workers``, ``aleatoria_workers_ready``, ``aleatoria_worker_restarts_total``,
  ``aleatoria_worker_up{worker}``, ``aleatoria_worker_info{worker,instance_id,pid}``).
  Prometheus sums over ``worker`` (``sum without (worker) (...)``).
- ``/health``: the sum of connections, the worst Redis and bus states, and each worker's
  own body under ``instances``; ``status`` is ``ok`` when every worker answered, else
  ``degraded`` (still 200); 503 when none did.

Why not prometheus-client's multiprocess mode: our counters are plain ints read at scrape
time (``metrics.py``: prometheus-client's Counter costs a lock per increment), which that
mode cannot see; it shares files through a directory that must be wiped between runs; and
it does nothing for ``/health``. Asking the workers on each scrape is exact and needs
nothing on disk. A worker that does not answer within ``_ASK_TIMEOUT`` is reported
``aleatoria_worker_up{worker="I"} 0`` and left out of that scrape.

A single process (no ``--workers``) with ``metrics_port`` set answers both routes there
too, from its own figures, so the public port need not expose them.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from functools import partial
from typing import Any, Protocol

import orjson
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from aleatoria import metrics
from aleatoria.http import Request, answer_http, read_request, send_http

log = logging.getLogger("aleatoria.overview")

_READ_TIMEOUT = 10.0  # seconds a client of the operator port has to send its request
_ASK_TIMEOUT = 2.0  # seconds a worker has to answer the parent
_ANSWER_MAX = 32 * 1024 * 1024  # bytes of a worker's answer read (metrics are ~100 KB)

Answer = Callable[[socket.socket, Request], Awaitable[None]]


def worker_view_name(parent_pid: int, index: int) -> str:
    """The abstract Unix socket on which worker ``index`` of ``parent_pid`` answers."""
    return f"\0aleatoria/{parent_pid}/worker/{index}"


def open_view_listener(address: str | tuple[str, int]) -> socket.socket:
    """A listening, non-blocking socket for the operator routes: a TCP ``(host, port)`` or an
    abstract Unix name. Raises OSError if it cannot bind."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def local_answer(health: Callable[[], dict[str, object]], registry: CollectorRegistry) -> Answer:
    """Answers from one process's own figures (a worker's private socket, a single process's
    metrics port): ``/health``, ``/metrics``, anything else 404."""
    return partial(answer_http, health=health, registry=registry, page=None)


async def answer_forever(listener: socket.socket, answer: Answer) -> None:
    """Accept on ``listener`` and answer each request with ``answer`` until cancelled (the
    listener stays the caller's). One slow or broken client costs one task, never the loop."""
    async with trio.open_nursery() as nursery:
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await trio.sleep(0.1)  # out of descriptors for a moment: let others close
                    continue
                raise
            sock.setblocking(False)
            nursery.start_soon(_answer_one, sock, answer)


async def _answer_one(sock: socket.socket, answer: Answer) -> None:
    with sock:
        try:
            with trio.move_on_after(_READ_TIMEOUT):
                request = await read_request(sock)
                if request is not None:
                    await answer(sock, request)
        except OSError:
            pass  # the client left
        except Exception:
            log.exception("event=operator_request_failed")


# -- the parent's view ---------------------------------------------------------------------------


class Tree(Protocol):
    """What the view needs of the ``--workers`` parent (``workers.Supervisor``)."""

    count: int
    restarts: int

    def ready_workers(self) -> dict[int, int]:
        """Worker index -> pid, of the workers that are ready."""
        ...


class TreeView:
    """The parent's answers on ``metrics_port``: the workers' figures, asked on each request."""

    def __init__(self, tree: Tree, parent_pid: int) -> None:
        self._tree = tree
        self._parent_pid = parent_pid
        self._started = time.monotonic()

    async def answer(self, sock: socket.socket, request: Request) -> None:
        method = request.method
        if request.method not in ("GET", "HEAD"):
            await send_http(sock, 405, "Method not allowed\n", method=method)
        elif request.path == "/health":
            status, body = await self.health()
            await send_http(sock, status, orjson.dumps(body), content_type="application/json", method=method)
        elif request.path == "/metrics":
            await send_http(sock, 200, await self.metrics(), content_type=metrics.CONTENT_TYPE, method=method)
        else:
            await send_http(sock, 404, "Not found\n", method=method)

    async def health(self) -> tuple[int, dict[str, object]]:
        """The HTTP status and the body of the tree's ``/health``."""
        ready = self._tree.ready_workers()
        answers = await self._ask_all(ready, "/health")
        instances: list[dict[str, Any]] = []
        for index, pid in sorted(ready.items()):
            body = _json(answers.get(index))
            if body is not None:
                instances.append({"worker": index, "pid": pid, **body})
        every = len(instances) == self._tree.count
        return (200 if instances else 503), {
            "status": "ok" if every else "degraded",
            "workers": self._tree.count,
            "ready": len(ready),
            "answered": len(instances),
            "redis": _worst([str(i.get("redis")) for i in instances], ("degraded", "ok", "disabled")),
            "bus": _worst([str(i.get("bus")) for i in instances], ("down", "ok", "disabled")),
            "connections": sum(int(i.get("connections", 0)) for i in instances),
            "uptimeSeconds": round(time.monotonic() - self._started, 1),
            "instances": instances,
        }

    async def metrics(self) -> bytes:
        """The Prometheus text of every worker's metrics, labelled by worker, and the
        parent's own."""
        ready = self._tree.ready_workers()
        texts, healths = await self._ask_all(ready, "/metrics"), await self._ask_all(ready, "/health")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(self._families(ready, texts, healths)))
        return metrics.render(registry)

    def _families(
        self, ready: dict[int, int], texts: Mapping[int, bytes], healths: Mapping[int, bytes]
    ) -> list[Metric]:
        merged: dict[str, Metric] = {}
        for index in sorted(texts):
            for family in text_string_to_metric_families(texts[index].decode(errors="replace")):
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation, family.type)
                label = {"worker": str(index)}
                into.samples.extend(s._replace(labels={**s.labels, **label}) for s in family.samples)
        up = GaugeMetricFamily(
            "aleatoria_worker_up", "1 when the worker answered this scrape", labels=["worker"]
        )
        info = GaugeMetricFamily(
            "aleatoria_worker_info",
            "a ready worker's process id and instance id (value 1)",
            labels=["worker", "instance_id", "pid"],
        )
        for index, pid in sorted(ready.items()):
            up.add_metric([str(index)], 1.0 if index in texts else 0.0)
            body = _json(healths.get(index)) or {}
            info.add_metric([str(index), str(body.get("instance", "")), str(pid)], 1.0)
        own: list[Metric] = [
            GaugeMetricFamily("aleatoria_workers", "worker processes configured", value=self._tree.count),
            GaugeMetricFamily("aleatoria_workers_ready", "worker processes ready", value=len(ready)),
            CounterMetricFamily(
                "aleatoria_worker_restarts", "workers restarted after dying", value=self._tree.restarts
            ),
            up,
            info,
        ]
        return own + list(merged.values())

    async def _ask_all(self, ready: dict[int, int], path: str) -> dict[int, bytes]:
        """``path``'s body from every worker in ``ready`` that answers 200 in time."""
        answers: dict[int, bytes] = {}

        async def ask(index: int) -> None:
            body = await ask_worker(worker_view_name(self._parent_pid, index), path)
            if body is not None:
                answers[index] = body

        async with trio.open_nursery() as nursery:
            for index in ready:
                nursery.start_soon(ask, index)
        return answers


async def ask_worker(name: str, path: str) -> bytes | None:
    """GET ``path`` from the worker answering on ``name``; the body of a 200, else None (no
    answer within ``_ASK_TIMEOUT``, not listening, another status)."""
    data = b""
    with trio.move_on_after(_ASK_TIMEOUT) as scope:
        try:
            with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                await sock.connect(name)
                await sock.send(f"GET {path} HTTP/1.1\r\nhost: worker\r\n\r\n".encode())
                while chunk := await sock.recv(65536):
                    data += chunk
                    if len(data) > _ANSWER_MAX:
                        return None
        except OSError:
            return None
    if scope.cancelled_caught:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1:2]
    return body if status == [b"200"] else None


def _json(body: bytes | None) -> dict[str, Any] | None:
    if body is None:
        return None
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _worst(states: list[str], order: tuple[str, ...]) -> str:
    """The first state of ``order`` that any of ``states`` is ("unknown" for none)."""
    for state in order:
        if state in states:
            return state
    return "unknown"


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families
