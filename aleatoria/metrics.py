"""Metrics: plain counters on the hot path, turned into Prometheus text at scrape time.

prometheus-client's own Counter takes a lock on every ``inc``; a room broadcast to 500
members would pay that 500 times. So the server counts with plain ints and dicts in
``Stats`` (trio runs it on one thread), and a custom collector reads them when ``/metrics``
is scraped. Slow paths that run in worker threads (Redis calls) may use prometheus-client
metrics directly, registered in ``REGISTRY``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=False)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@attrs.define
class Stats:
    """Counters of one server process. Increment freely; reads happen at scrape time."""

    connections_opened: int = 0
    handshake_rejections: Counter[int] = attrs.Factory(Counter)
    disconnects: Counter[int] = attrs.Factory(Counter)
    messages_in: Counter[str] = attrs.Factory(Counter)
    messages_out: Counter[str] = attrs.Factory(Counter)
    errors: Counter[str] = attrs.Factory(Counter)
    matches: int = 0
    # Safety (PROTOCOL.md section 13).
    reports: Counter[str] = attrs.Factory(Counter)  # by reason
    blocks: int = 0
    bans: int = 0
    kicks: int = 0
    webhook_deliveries: int = 0
    webhook_failures: int = 0
    webhook_dropped: int = 0


class ServerCollector(Collector):
    """Reads ``Stats`` plus live gauges (``gauges`` returns name -> (help, value))."""

    def __init__(
        self,
        stats: Stats,
        counters: Callable[[], dict[str, tuple[str, float]]],
        gauges: Callable[[], dict[str, tuple[str, float]]],
    ) -> None:
        self._stats = stats
        self._counters = counters
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        yield _counter("aleatoria_connections_opened", "WebSocket sessions accepted", s.connections_opened)
        yield _labelled(
            CounterMetricFamily,
            "aleatoria_handshake_rejections",
            "HTTP handshakes refused, by status",
            "status",
            s.handshake_rejections,
        )
        yield _labelled(
            CounterMetricFamily,
            "aleatoria_disconnects",
            "WebSocket sessions ended, by close code (1013: slow consumer, 1008: abuse)",
            "code",
            s.disconnects,
        )
        yield _labelled(
            CounterMetricFamily, "aleatoria_messages_in", "client messages by type", "type", s.messages_in
        )
        yield _labelled(
            CounterMetricFamily,
            "aleatoria_messages_out",
            "server messages by type (room broadcasts count once per recipient)",
            "type",
            s.messages_out,
        )
        yield _labelled(CounterMetricFamily, "aleatoria_errors", "error replies by code", "code", s.errors)
        yield _counter("aleatoria_matches", "random matches made by this process", s.matches)
        yield _labelled(
            CounterMetricFamily, "aleatoria_reports", "user reports filed, by reason", "reason", s.reports
        )
        yield _counter("aleatoria_blocks", "blocks made by users (reports included)", s.blocks)
        yield _counter("aleatoria_bans", "bans issued (operator and automatic)", s.bans)
        yield _counter("aleatoria_kicks", "users closed with 4003 (bans and kicks)", s.kicks)
        yield _counter(
            "aleatoria_webhook_deliveries", "reports delivered to the webhook", s.webhook_deliveries
        )
        yield _counter(
            "aleatoria_webhook_failures", "failed webhook attempts (each retry counts)", s.webhook_failures
        )
        yield _counter(
            "aleatoria_webhook_dropped",
            "reports dropped unsent from a full webhook queue (the oldest waiting goes first)",
            s.webhook_dropped,
        )
        for name, (helptext, value) in self._counters().items():
            yield _counter(name, helptext, value)
        for name, (helptext, value) in self._gauges().items():
            yield GaugeMetricFamily(name, helptext, value=value)


def _counter(name: str, helptext: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, helptext, value=value)


def _labelled(kind: Any, name: str, helptext: str, label: str, values: Counter[Any]) -> Metric:
    family = kind(name, helptext, labels=[label])
    for key, value in sorted(values.items(), key=lambda item: str(item[0])):
        family.add_metric([str(key)], value)
    metric: Metric = family
    return metric


def render(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry)
