"""The Celery-asyncio bridge: one event loop per worker process, and the resources bound to it.

Celery has no async tasks, so each task body is driven on this process's loop. The loop, the
database engine (pooled) and the aiohttp session are created lazily on first use, after the
prefork pool has forked, live as long as the process, and are closed on the same loop at
process shutdown. Reusing one loop keeps pooled connections and keep-alive HTTP connections
valid across tasks (a second `asyncio.run` would strand them on a dead loop).
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

from service.bybit.client import BybitClient, create_http_session
from service.config import Settings
from service.db import SessionScope, create_engine, create_session_factory, scope_for
from service.execution import ExecutionDeps
from service.market_cache import MarketCache
from service.market_data import MarketData
from service.queue import CeleryPublisher
from service.run_lock import advisory_run_lock
from service.security import CredentialCipher

T = TypeVar("T")


@dataclass
class Resources:
    engine: AsyncEngine
    http: ClientSession
    sessions: SessionScope
    deps: ExecutionDeps
    publisher: CeleryPublisher
    redis: aioredis.Redis
    market_cache: MarketCache

    @classmethod
    async def open(cls, settings: Settings) -> Resources:
        from celery_app import app as celery_app

        engine = create_engine(settings.database_url, pool_size=4)
        sessions = scope_for(create_session_factory(engine))
        http = create_http_session(
            connect_timeout=settings.http_connect_timeout_seconds,
            read_timeout=settings.http_read_timeout_seconds,
        )
        exchange = BybitClient(
            http, settings.bybit_base_url, recv_window=settings.bybit_recv_window
        )
        deps = ExecutionDeps(
            sessions=sessions,
            run_lock=advisory_run_lock(engine),
            exchange=exchange,
            market=MarketData(exchange),
            cipher=CredentialCipher(settings.credentials_keys.get_secret_value()),
            retry_delays=settings.trade_retry_delays,
            preflight_margin=settings.preflight_margin,
        )
        publisher = CeleryPublisher(celery_app, queue=settings.celery_queue)
        redis = aioredis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        return cls(
            engine=engine,
            http=http,
            sessions=sessions,
            deps=deps,
            publisher=publisher,
            redis=redis,
            market_cache=MarketCache(redis, max_age_seconds=settings.market_max_age_seconds),
        )

    async def close(self) -> None:
        await self.http.close()
        await self.redis.aclose()
        await self.engine.dispose()


class WorkerRuntime:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._runner: asyncio.Runner | None = None
        self._resources: Resources | None = None
        self._pid: int | None = None

    def run(self, work: Callable[[Resources], Awaitable[T]]) -> T:
        runner = self._ensure_runner()
        # Each task starts with empty log context; the run binds its own ids in a copy.
        structlog.contextvars.clear_contextvars()
        return runner.run(self._call(work), context=contextvars.copy_context())

    async def _call(self, work: Callable[[Resources], Awaitable[T]]) -> T:
        if self._resources is None:
            self._resources = await Resources.open(self._settings)
        return await work(self._resources)

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
