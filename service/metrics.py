"""Prometheus metrics. Counters and histograms live where the work happens (the worker's
pool processes write them to PROMETHEUS_MULTIPROC_DIR and the worker's main process serves
them); gauges of state (positions by status, queue depth) are read by the API's operations
endpoint (service/metrics_server.py), the counts of positions through `SharedReading`."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Generic, TypeVar

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


T = TypeVar("T")


class SharedReading(Generic[T]):
    """A value that is costly to read (the positions by status are a count over the whole
    table), read at most once every `max_age` seconds: scrapes in between get the last value,
    and scrapes arriving while it is being read wait for that one read instead of starting
    their own. A failed read is not kept: every waiter gets its error, the next scrape reads
    again."""

    def __init__(
        self,
        read: Callable[[], Awaitable[T]],
        max_age: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._max_age = max_age
        self._clock = clock
        self._value: T | None = None
        self._read_at = 0.0
        self._pending: asyncio.Future[T] | None = None
        self.reads = 0  # how many times the value was read (for tests and curiosity)

    async def get(self) -> T:
        if self._value is not None and self._clock() - self._read_at < self._max_age:
            return self._value
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._refresh())
        # Shielded: a scrape that gives up (its client left) does not cancel the others' read.
        return await asyncio.shield(self._pending)

    async def _refresh(self) -> T:
        try:
            self.reads += 1
            value = await self._read()
            self._value, self._read_at = value, self._clock()
            return value
        finally:
            self._pending = None


class _StateGauges(Collector):
    def __init__(self, positions: Mapping[str, int] | None, queue_depth: int | None) -> None:
        self._positions = positions
        self._queue_depth = queue_depth

    def collect(self) -> Iterable[Metric]:
        if self._positions is not None:
            by_status = GaugeMetricFamily(
                "trader_positions", "Positions by status", labels=["status"]
            )
            for status, count in sorted(self._positions.items()):
                by_status.add_metric([status], count)
            yield by_status
        if self._queue_depth is not None:
            yield GaugeMetricFamily(
                "trader_queue_depth",
                "Messages waiting in the trades queue",
                value=self._queue_depth,
            )


def render_api_metrics(positions: Mapping[str, int] | None, queue_depth: int | None) -> bytes:
    """This process's metrics plus the state gauges (each left out when it could not be
    read: an absent series is an alert, a stale or zero one would mislead)."""
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
