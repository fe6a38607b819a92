"""The Celery-asyncio bridge: one event loop per worker process, and the resources bound to it.

Celery has no async tasks, so each task body is driven on this process's loop. The loop, the
database engine (pooled) and the aiohttp session are created lazily on first use, after the
prefork pool has forked, live as long as the process, and are closed on the same loop at
process shutdown. Reusing one loop keeps pooled connections and keep-alive HTTP connections
valid across tasks (a second `asyncio.run` would strand them on a dead loop).

Reusing a loop has one danger: a coroutine left pending on it comes back to life the next time
the loop runs, inside another task's run. Celery's soft time limit does exactly that (billiard
raises it from a signal handler, so it leaves `run_until_complete` while the run's coroutine
stays pending, still holding its locks). So each task run has a deadline inside the loop (the
work sees it and winds down by itself), a hard stop a grace period later, and whatever way the
loop call ends (result, exception, soft limit), every task still on the loop is cancelled and
drained before the process takes its next message. What cannot be drained ends the process:
the pool replaces it, and closing its sockets releases its locks.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import redis.asyncio as aioredis
import structlog
from aiohttp import ClientSession
from sqlalchemy.ext.asyncio import AsyncEngine

from service.account_memo import RedisAccountMemo
from service.bybit.client import BybitClient, create_http_session
from service.config import Settings
from service.db import (
    ConnectionHealth,
    SessionScope,
    create_engine,
    create_session_factory,
    scope_for,
)
from service.execution import ExecutionDeps
from service.execution.run_lock import advisory_run_lock
from service.market.data import MarketData
from service.market.snapshot import MarketCache
from service.queue import RedisTaskPublisher
from service.rate_limits import RedisCallGate

T = TypeVar("T")
logger = structlog.stdlib.get_logger("workers.runtime")
# The exit status of a process that could not drain a run (the pool starts a new one).
UNDRAINABLE_EXIT = 70


@dataclass
class Resources:
    engine: AsyncEngine
    http: ClientSession
    sessions: SessionScope
    deps: ExecutionDeps
    publisher: RedisTaskPublisher
    redis: aioredis.Redis
    market_cache: MarketCache

    @classmethod
    async def open(cls, settings: Settings) -> Resources:
        engine = create_engine(
            settings.database_url, pool_size=4, health=ConnectionHealth.from_settings(settings)
        )
        sessions = scope_for(create_session_factory(engine))
        redis = aioredis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        http = create_http_session(
            connect_timeout=settings.http_connect_timeout_seconds,
            read_timeout=settings.http_read_timeout_seconds,
        )
        exchange = BybitClient(
            http,
            settings.bybit_base_url,
            recv_window=settings.bybit_recv_window,
            ip_ban_seconds=settings.bybit_ip_ban_seconds,
            # Bybit's limits are per account and per address, not per process: counted in
            # Redis by every worker.
            gate=RedisCallGate(
                redis,
                egress=settings.bybit_egress_id,
                share=settings.bybit_limit_share,
                ip_limit=settings.bybit_ip_limit,
            ),
        )
        # With MARKET_SNAPSHOT_KEY, a snapshot this worker sizes orders with must carry the MAC
        # the refresh job (a worker too) wrote: anything else is refused and the exchange asked.
        market_cache = MarketCache(
            redis,
            max_age_seconds=settings.market_max_age_seconds,
            secret=settings.market_snapshot_key,
        )
        publisher = RedisTaskPublisher(redis, queue=settings.celery_queue)
        deps = ExecutionDeps.from_settings(
            settings,
            sessions=sessions,
            run_lock=advisory_run_lock(engine),
            exchange=exchange,
            # Filters and prices from Beat's shared snapshot, not a call per symbol.
            market=MarketData(exchange, snapshot=market_cache.load),
            memo=RedisAccountMemo(redis),
            # The basket holding an account sends the next one waiting for it.
            publisher=publisher,
        )
        return cls(
            engine=engine,
            http=http,
            sessions=sessions,
            deps=deps,
            publisher=publisher,
            redis=redis,
            market_cache=market_cache,
        )

    async def close(self) -> None:
        await self.http.close()
        await self.redis.aclose()
        await self.engine.dispose()


class RunOverranError(Exception):
    """The work did not end within the grace period after its deadline and was cancelled."""


Work = Callable[[Resources, float], Awaitable[T]]


class WorkerRuntime:
    def __init__(
        self,
        settings: Settings,
        open_resources: Callable[[Settings], Awaitable[Resources]] = Resources.open,
    ) -> None:
        self._settings = settings
        self._open_resources = open_resources
        self._runner: asyncio.Runner | None = None
        self._resources: Resources | None = None
        self._pid: int | None = None

    def run(self, work: Work[T]) -> T:
        """Run `work(resources, deadline)` on this process's loop. `deadline` is the loop time
        by which the work must have stopped sending anything and begun to wind down."""
        runner = self._ensure_runner()
        loop = runner.get_loop()
        deadline = loop.time() + self._settings.run_deadline_seconds
        # Each task starts with empty log context; the run binds its own ids in a copy.
        structlog.contextvars.clear_contextvars()
        try:
            return runner.run(self._call(work, deadline), context=contextvars.copy_context())
        finally:
            # However the loop call ended (a result, an exception, Celery's soft limit raised
            # from a signal handler), nothing of this run may stay on the loop.
            self._drain(loop)

    async def _call(self, work: Work[T], deadline: float) -> T:
        stop = asyncio.timeout_at(deadline + self._settings.run_grace_seconds)
        try:
            async with stop:
                if self._resources is None:
                    self._resources = await self._open_resources(self._settings)
                return await work(self._resources, deadline)
        except TimeoutError:
            if not stop.expired():
                raise
            logger.error(
                "run.cancelled",
                reason="the run did not wind down within its grace period after the deadline",
                grace_s=self._settings.run_grace_seconds,
            )
            raise RunOverranError(
                f"the run was cancelled {self._settings.run_grace_seconds:g} s after its "
                "deadline; the position is left to its next attempt or the recovery sweep"
            ) from None

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        pending = asyncio.all_tasks(loop)
        if not pending:
            return
        for task in pending:
            task.cancel()
        try:
            # The cancelled tasks run their clean-up (release locks, return connections) now.
            loop.run_until_complete(asyncio.wait(pending, timeout=self._settings.run_grace_seconds))
        finally:
            # Even if the soft limit strikes while draining, nothing may stay behind.
            left = [t for t in pending if not t.done()]
            logger.warning("run.drained", cancelled=len(pending) - len(left), left=len(left))
            if left:
                # A coroutine that ignores cancellation would wake up inside the next task's
                # run: end the process instead (its sockets close, PostgreSQL releases its
                # locks, and the message, not acknowledged, is delivered again).
                logger.error("run.undrainable", tasks=[repr(t) for t in left][:5])
                os._exit(UNDRAINABLE_EXIT)

    def _ensure_runner(self) -> asyncio.Runner:
        if self._runner is not None and self._pid != os.getpid():
            # Inherited across a fork: the parent's loop and sockets are not ours to use.
            self._runner, self._resources = None, None
        if self._runner is None:
            self._runner = asyncio.Runner()
            self._pid = os.getpid()
        return self._runner

    def close(self) -> None:
        if self._runner is None or self._pid != os.getpid():
            return
        if self._resources is not None:
            self._runner.run(self._resources.close())
            self._resources = None
        self._runner.close()
        self._runner = None
