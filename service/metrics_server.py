"""The API's operations endpoint: Prometheus' /metrics on its own address
(API_METRICS_HOST:API_METRICS_PORT), never on the public one.

It runs in every API process, on the process's own event loop, beside uvicorn (started and
stopped by the app's lifespan, service/api.py), and reads the state the app holds (database,
Redis). With several uvicorn workers (`api --workers N`) every process binds the same port
with SO_REUSEPORT and the kernel spreads the scrapes among them: the state gauges are the
deployment's (one database, one queue) whichever process answers; the process metrics are
those of the process that answered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from service.db import SessionFactory
from service.logging import get_logger
from service.metrics import CONTENT_TYPE, SharedReading, render_api_metrics
from service.positions.repository import count_by_status

logger = get_logger("service.metrics_server")


def counts_reader(session_factory: SessionFactory) -> Callable[[], Awaitable[dict[str, int]]]:
    async def read() -> dict[str, int]:
        async with session_factory() as session:
            return await count_by_status(session)

    return read


class MetricsServer:
    """GET /metrics and nothing else. The positions by status are a full count: read through
    a SharedReading (at most once every METRICS_COUNTS_CACHE_SECONDS, one read for scrapes
    that arrive together); the queue depth is one LLEN, read per scrape."""

    def __init__(
        self,
        counts: SharedReading[dict[str, int]],
        redis: Any,
        queue: str,
    ) -> None:
        self.counts = counts  # public: a test counts its reads
        self._redis = redis
        self._queue = queue
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        # No access log (a line per scrape), no signal handling (uvicorn's).
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_port=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        logger.info("api.metrics_serving", host=host, port=port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _: web.Request) -> web.Response:
        positions: dict[str, int] | None
        try:
            positions = await self.counts.get()
        except (SQLAlchemyError, OSError, TimeoutError) as error:
            logger.warning("api.metrics_counts_unavailable", error=type(error).__name__)
            positions = None
        try:
            depth: int | None = int(await self._redis.llen(self._queue))
        except (RedisError, OSError) as error:
            logger.warning("api.metrics_queue_unavailable", error=type(error).__name__)
            depth = None
        body = render_api_metrics(positions, depth)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
