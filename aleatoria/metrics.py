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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=False)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# Seconds a searcher waits for a partner (the fallback to anyone comes at 10 s by default).
SEARCH_WAIT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0)


@attrs.define
class Histogram:
    """A histogram counted with plain numbers (``bounds``: upper bounds, ascending)."""

    bounds: tuple[float, ...]
    counts: list[int] = attrs.Factory(list)
    total: float = 0.0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        index = len(self.bounds)
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                index = i
                break
        self.counts[index] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, ``+Inf`` last, as Prometheus wants them."""
        counts = self.counts or [0] * (len(self.bounds) + 1)
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


@attrs.define
class Stats:
    """Counters of one server process. Increment freely; reads happen at scrape time."""

    connections_opened: int = 0
    handshake_rejections: Counter[int] = attrs.Factory(Counter)
    disconnects: Counter[int | str] = attrs.Factory(Counter)  # by close code; "other": see server.py
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
    # Matching (PROTOCOL.md section 12).
    matches_by_common: Counter[int] = attrs.Factory(Counter)
    search_fallbacks: int = 0
    search_timeouts: int = 0
    search_wait: Histogram = attrs.Factory(lambda: Histogram(SEARCH_WAIT_BUCKETS))

    def count_match(self, common: int) -> None:
        self.matches += 1
        self.matches_by_common[common] += 1


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
            CounterMetricFamily,
            "aleatoria_matches_by_common_interests",
            "matches made by this process, by how many interests the two share",
            "common",
            s.matches_by_common,
        )
        yield _counter(
            "aleatoria_search_fallbacks",
            "searchers with interests matched with no interest in common (after the interest wait)",
            s.search_fallbacks,
        )
        yield _counter(
            "aleatoria_search_timeouts", "searches that ended with no_peer_available", s.search_timeouts
        )
        wait = s.search_wait
        yield HistogramMetricFamily(
            "aleatoria_search_wait_seconds",
            "seconds searchers waited in the queue before a match",
            buckets=wait.buckets(),
            sum_value=wait.total,
        )
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
