"""One view for operators with ``--workers``: the parent answers ``/health`` and
``/metrics`` on ``ALEATORIA_METRICS_PORT`` for the whole process tree (every worker asked,
samples labelled by worker), where the shared main port answers from one worker at random.
The exposition is parsed with prometheus-client and every family's type is checked against
docs/operations.md's metrics table, and Prometheus' naming (counters end in ``_total``)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import trio
from health import documented_health_bodies, get_json
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from redis_server import RedisServer
from scaleout_support import ServerProcess, serve_process
from support import SocketPeer, connect

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
_METRICS_PORT = re.compile(r"metrics=http://127\.0\.0\.1:(\d+)/metrics")


def documented_types() -> dict[str, str]:
    """Metric name -> type, from the table between docs/operations.md's metrics markers."""
    text = DOCS.read_text()
    table = text.split("<!-- metrics-table -->", 1)[1].split("<!-- /metrics-table -->", 1)[0]
    types: dict[str, str] = {}
    for row in table.splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        name = cells[0].strip("`").split("{", 1)[0]
        types[name] = cells[1]
    return types


def exposed_name(family_name: str, kind: str) -> str:
    """The name Prometheus shows for a family (the parser drops a counter's ``_total``)."""
    return family_name + "_total" if kind == "counter" else family_name


async def scrape(port: int) -> tuple[dict[str, str], list[Sample]]:
    """(name -> type, every sample) of ``/metrics`` on ``port``, parsed by prometheus-client."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    types: dict[str, str] = {}
    samples: list[Sample] = []
    for family in text_string_to_metric_families(body.decode()):
        types[exposed_name(family.name, family.type)] = family.type
        samples.extend(family.samples)
    return types, samples


def metrics_port(server: ServerProcess) -> int:
    found = _METRICS_PORT.search(server.text())
    assert found, server.text()
    return int(found.group(1))


async def test_the_parent_answers_for_every_worker(redis_server: RedisServer) -> None:
    """``--workers 2 --metrics-port 0``: /health on the metrics port always counts every
    worker's connections and lists both instances; /metrics carries every worker's families
    labelled ``worker``, with the parent's own; every family has the type the docs give it
    (no more, no fewer), counters end in ``_total`` and nothing else does."""
    async with serve_process(
        "--redis-url", redis_server.url, "--workers", "2", "--metrics-port", "0"
    ) as server:
        port = metrics_port(server)
        async with trio.open_nursery() as nursery:
            clients: list[SocketPeer] = []
            all_in = trio.Event()

            async def hold(user: str) -> None:
                async with connect(server.port, user, "Den", skip=True) as client:
                    clients.append(client)
                    if len(clients) == 10:
                        all_in.set()
                    await trio.sleep_forever()

            for n in range(10):
                nursery.start_soon(hold, f"v{n}")
            with trio.fail_after(10):
                await all_in.wait()
            await clients[0].send({"type": "chat_message", "room": "Den", "payload": {"content": "hi"}})
            for client in clients:
                await client.expect("chat_message", skip=True)

            seen_instances: set[str] = set()
            for _ in range(6):  # each on a new connection: the main port would alternate
                health = await get_json(port, "/health")
                assert ("ok", 2, 2, 2, 10) == (
                    health["status"],
                    health["workers"],
                    health["ready"],
                    health["answered"],
                    health["connections"],
                )
                assert [0, 1] == [i["worker"] for i in health["instances"]]
                seen_instances |= {i["instance"] for i in health["instances"]}
                assert 10 == sum(i["connections"] for i in health["instances"])
            assert 2 == len(seen_instances)
            single, tree = documented_health_bodies()
            assert sorted(tree) == sorted(health)  # the docs show the real body
            assert sorted(["worker", "pid", *single]) == sorted(health["instances"][0])

            types, samples = await scrape(port)
            nursery.cancel_scope.cancel()

    # Every family has its documented type, and the docs list every family.
    documented = documented_types()
    created = {name for name in types if name.endswith("_created")}
    assert documented == {name: kind for name, kind in types.items() if name not in created}
    for name, kind in types.items():
        assert name.endswith("_total") == (kind == "counter"), (name, kind)
    # Every worker's samples carry its index; the parent's own figures are there.
    by_name: dict[str, dict[str, float]] = defaultdict(dict)
    for sample in samples:
        by_name[sample.name][str(sorted(sample.labels.items()))] = sample.value
        if not sample.name.startswith(("aleatoria_worker", "aleatoria_workers")):
            assert sample.labels.get("worker") in ("0", "1"), sample
    assert 10 == sum(by_name["aleatoria_connections"].values())
    assert 2 == len(by_name["aleatoria_connections"])
    assert [1.0, 1.0] == list(by_name["aleatoria_worker_up"].values())
    assert {str(i) for i in seen_instances} == {
        label_value
        for sample in samples
        if sample.name == "aleatoria_worker_info"
        for key, label_value in sample.labels.items()
        if key == "instance_id"
    }
    assert [2.0] == list(by_name["aleatoria_workers_ready"].values())
    assert 1 <= sum(by_name["aleatoria_broadcasts_total"].values())
