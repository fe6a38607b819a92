"""Prometheus metrics. Counters and histograms live where the work happens (the worker's
pool processes write them to PROMETHEUS_MULTIPROC_DIR and the worker's main process serves
them); gauges of state (positions by status, queue depth) are read at scrape time by the
API's /metrics."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LEG_LATENCY = Histogram(
    "trader_leg_latency_seconds",
    "From sending a leg's market order to its recorded fill (or final failure)",
    ["outcome"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RETRIES = Counter(
    "trader_retries_total", "Runs ended by a transient error and scheduled again", ["reason"]
)
EXCHANGE_ERRORS = Counter(
    "trader_exchange_errors_total",
    "Errors answered by (or on the way to) the exchange, by retCode or HTTP status",
    ["reason"],
)
POSITIONS_FINISHED = Counter(
    "trader_positions_finished_total", "Positions that reached a final status", ["status"]
)
RECONCILIATION_MISMATCHES = Counter(
    "trader_reconciliation_mismatches_total",
    "Differences between recorded fills and the exchange's records",
    ["kind"],
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _StateGauges(Collector):
    def __init__(self, positions: Mapping[str, int], queue_depth: int | None) -> None:
        self._positions = positions
        self._queue_depth = queue_depth

    def collect(self) -> Iterable[Metric]:
        by_status = GaugeMetricFamily("trader_positions", "Positions by status", labels=["status"])
        for status, count in sorted(self._positions.items()):
            by_status.add_metric([status], count)
        yield by_status
        if self._queue_depth is not None:
            yield GaugeMetricFamily(
                "trader_queue_depth",
                "Messages waiting in the trades queue",
                value=self._queue_depth,
            )


def render_api_metrics(positions: Mapping[str, int], queue_depth: int | None) -> bytes:
    """This process's metrics plus the state gauges read for this scrape."""
    state = CollectorRegistry()
    state.register(_StateGauges(positions, queue_depth))
    return generate_latest(REGISTRY) + generate_latest(state)


def multiprocess_registry() -> CollectorRegistry:
    """All pool processes' metrics, for the worker's main process to serve."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
