"""Metrics: the Prometheus series a connector exposes on ``GET /metrics``.

Each :class:`Metrics` has its own registry (``self.metrics.registry``, where a connector
adds its own series), so connectors or tests in one process never share counters.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily, Metric

from cdk.cli import project_metadata

__all__ = ["CONTENT_TYPE", "LoopHistogram", "Metrics", "Tally"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Tally:
    """Increments of a counter (a labelled child) kept as a plain int, added to it each
    time the registry is read: prometheus_client takes a lock on every ``inc``, too much
    for a count made on each request. Counted from the event loop's thread only."""

    __slots__ = ("_counter", "count")

    def __init__(self, counter: Any) -> None:
        self._counter = counter
        self.count = 0

    def flush(self) -> None:
        if self.count:
            count, self.count = self.count, 0
            self._counter.inc(count)


class _Flush:
    """Registered first: before any series is read (``/metrics``, ``get_sample_value``),
    the tallies are added to their counters."""

    def __init__(self, tallies: list[Tally]) -> None:
        self.tallies = tallies

    def collect(self) -> Iterator[Metric]:
        for tally in self.tallies:
            tally.flush()
        return iter(())


class LoopHistogram:
    """A histogram observed from the event loop's thread only, in plain numbers, for what
    is observed on every request (prometheus_client's ``Histogram`` takes two locks per
    observation); exposed as the same ``_bucket``, ``_count`` and ``_sum`` series."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = list(_LATENCY_BUCKETS)
        self._labels = [repr(float(bound)) for bound in self._bounds] + ["+Inf"]
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        registry.register(self)

    def observe(self, amount: float) -> None:
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation)
        buckets, total = [], 0
        for label, count in zip(self._labels, self._counts, strict=True):
            total += count
            buckets.append((label, total))
        family.add_metric([], buckets, self._sum)
        yield family


class Metrics:
    """The series of one connector process. Cheap to update (well under 1 us each)."""

    def __init__(
        self, connector: str = "connector", *, receiving: bool = True, delivering: bool = True
    ) -> None:
        from cdk import __version__ as kit_version  # not at import: cdk imports this first

        self.registry = CollectorRegistry(auto_describe=True)
        self._tallies: list[Tally] = []
        self.registry.register(_Flush(self._tallies))
        counter = partial(Counter, registry=self.registry)
        gauge = partial(Gauge, registry=self.registry)
        histogram = partial(Histogram, buckets=_LATENCY_BUCKETS, registry=self.registry)
        # The connector's version is its pyproject.toml's, so a dashboard shows the release.
        version = project_metadata().get("version", "unknown")
        info = gauge(
            "cdk_connector_info", "Connector identity.", ["connector", "version", "kit_version"]
        )
        info.labels(connector, version, kit_version).set(1)
        if delivering:
            self.delivered = counter("cdk_events_delivered", "Events the target accepted.")
            self.failed = counter("cdk_events_failed", "Events given up on, by reason.", ["reason"])
            self.retries = counter("cdk_delivery_retries", "Delivery attempts that were retried.")
            self.delivery_in_flight = gauge(
                "cdk_delivery_in_flight", "Delivery requests in flight."
            )
            self.delivery_latency = histogram(
                "cdk_delivery_latency_seconds",
                "Time from the first attempt to the target's final answer, per request.",
            )
            self.queue_depth = gauge("cdk_source_queue_depth", "Events waiting in Source.chan.")
            self.delivery_waiting = gauge(
                "cdk_delivery_waiting", "Events waiting for their next attempt."
            )
            self.retry_window = gauge(
                "cdk_delivery_retry_window", "Requests that may wait for or make a retry at once."
            )
            self.dead_lettered = counter(
                "cdk_events_dead_lettered", "Events the dead-letter target took."
            )
        # Every port the kit serves counts its answers (a polling source's metrics_port too).
        self.responses = counter("cdk_http_responses", "HTTP answers, by status code.", ["status"])
        if receiving:
            self.received = counter(
                "cdk_events_received", "Events received, by content mode.", ["mode"]
            )
            self.handler_latency = LoopHistogram(
                "cdk_arrived_latency_seconds",
                "Time spent in the connector's handler (arrived or make_event), per request.",
                self.registry,
            )
            self.handler_in_flight = gauge("cdk_arrived_in_flight", "Handler calls in progress.")
            self.duplicates = counter(
                "cdk_sink_duplicates",
                "Events a sink acknowledged again without calling arrived (dedupe_window).",
            )
            self.sink_dead_lettered = counter(
                "cdk_sink_dead_lettered",
                "Events a sink's dead-letter target took, by the code arrived gave them.",
                ["code"],
            )

    def tally(self, counter: Any) -> Tally:
        """A :class:`Tally` of ``counter`` (a counter without labels, or a labelled child)."""
        tally = Tally(counter)
        self._tallies.append(tally)
        return tally

    def render(self) -> bytes:
        """The Prometheus text exposition of every series."""
        return generate_latest(self.registry)
