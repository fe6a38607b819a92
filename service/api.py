"""The FastAPI app factory: lifespan (engine, broker publisher), routers, error handlers."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.budgets import Budgets, UserIds
from service.bybit import constants as bybit_constants
from service.bybit.client import BybitClient, create_http_session
from service.config import Settings, get_settings
from service.credentials.endpoints import router as credentials_router
from service.db import create_engine, create_pool, create_session_factory
from service.dependencies import BEARER_SECURITY, request_bearer_token
from service.errors import AuthenticationError, DomainError, TooManyRequestsError
from service.http_edge import SecurityHeaders, cors_options
from service.indices.cache import IndexCache
from service.indices.endpoints import router as indices_router
from service.logging import configure_logging
from service.market.snapshot import MarketCache
from service.metrics import SharedReading
from service.metrics_server import MetricsServer, counts_reader
from service.positions.endpoints import router as positions_router
from service.positions.hot_path import RenderedPositions
from service.queue import RedisTaskPublisher
from service.rate_limits import RedisCallGate
from service.security import sealer_from_settings
from service.users.endpoints import router as tokens_router
from service.users.service import authenticate

logger = structlog.stdlib.get_logger("service.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    if not structlog.is_configured():
        # `api --workers N`: uvicorn's worker processes are spawned afresh and build the app
        # here, without the command's logging set-up: their lines must be JSON too.
        configure_logging(settings.log_format, settings.log_level)
    # Refuse to start without a way to seal (or with unusable keys) rather than fail on the
    # first PUT. The API seals only: it holds no key that opens (service/security.py).
    cipher = sealer_from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The engine serves the full paths only (refusals, replays, first renders, lists,
        # credentials): with the hot paths' pool, at most 20 connections a process as before.
        engine = create_engine(settings.database_url, pool_size=5)
        # The hot paths' own pool (one statement per request, no ORM). It connects on first
        # use, so the API starts, and answers 503, while the database is down.
        pool = await create_pool(settings.database_url, max_size=10)
        app.state.session_factory = create_session_factory(engine)
        app.state.pool = pool
        app.state.cipher = cipher
        app.state.index_cache = IndexCache()
        app.state.rendered = RenderedPositions()
        app.state.redis = aioredis.from_url(
            settings.redis_url, socket_timeout=2, socket_connect_timeout=2
        )
        app.state.publisher = RedisTaskPublisher(app.state.redis, queue=settings.celery_queue)
        # No MARKET_SNAPSHOT_KEY here: the API only answers with the snapshot (sizes refused
        # early, values shown), it moves no money; the workers, which size real orders with
        # it, check its MAC (workers/runtime.py).
        app.state.market_cache = MarketCache(
            app.state.redis, max_age_seconds=settings.market_max_age_seconds
        )
        _open_budgets_and_exchange(app, settings)
        # Everything made so far lives as long as the process: out of the collector's way, so
        # a full collection under load walks only what requests allocate (shorter pauses).
        gc.freeze()
        try:
            yield
        finally:
            await app.state.http.close()
            await app.state.redis.aclose()
            await pool.close()
            await engine.dispose()

    docs = settings.api_docs_enabled  # off: /docs, /redoc and /openapi.json are 404
    app = _EdgeApp(
        title="Synthetic index trader",
        version="0.1.0",
        description="Open synthetic index positions on Bybit; a worker places one market "
        "order per component. Decimals travel as strings.",
        lifespan=_with_metrics_server(lifespan, settings),
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.include_router(positions_router)
    app.include_router(indices_router)
    app.include_router(credentials_router)
    app.include_router(tokens_router)
    _add_health(app)
    app.add_middleware(BodyLimit)
    if settings.cors_allow_origins:  # none by default: no CORS header at all
        app.add_middleware(CORSMiddleware, **cors_options(settings.cors_allow_origins))
    _add_error_handlers(app)
    return app


class _EdgeApp(FastAPI):
    """FastAPI with SecurityHeaders outside its whole stack, Starlette's error middleware
    included (middleware added with add_middleware sits inside it), so that every answer,
    a 500 too, carries them."""

    def build_middleware_stack(self) -> ASGIApp:
        return SecurityHeaders(super().build_middleware_stack())


Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def _with_metrics_server(lifespan: Lifespan, settings: Settings) -> Lifespan:
    """The app's lifespan, plus the operations endpoint (service/metrics_server.py) on its
    own address while the app runs (API_METRICS_PORT=0: none)."""

    @asynccontextmanager
    async def with_metrics(app: FastAPI) -> AsyncIterator[None]:
        async with lifespan(app):
            if not settings.api_metrics_port:
                yield
                return
            counts = SharedReading(
                counts_reader(app.state.session_factory),
                max_age=settings.metrics_counts_cache_seconds,
            )
            server = MetricsServer(counts, app.state.redis, settings.celery_queue)
            await server.start(settings.api_metrics_host, settings.api_metrics_port)
            app.state.metrics_server = server
            try:
                yield
            finally:
                await server.stop()

    return with_metrics


MAX_BODY_BYTES = 64 * 1024


class BodyLimit:
    """Refuse a request body over MAX_BODY_BYTES with 413 before reading it all (pure ASGI,
    so it also stops bodies sent without a Content-Length)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is None and b"transfer-encoding" not in headers:
            # HTTP/1.1: no length and no chunks is no body (every poll): nothing to count.
            await self.app(scope, receive, send)
            return
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            await _too_large(send)
            return
        received = 0
        refused = False

        async def limited() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    # Answer now, and tell the app the client is gone so it stops reading.
                    refused = True
                    await _too_large(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:  # after the 413, whatever the app says is dropped
                await send(message)

        await self.app(scope, limited, guarded_send)


async def _too_large(send: Send) -> None:
    response = JSONResponse(
        {"detail": f"request body larger than {MAX_BODY_BYTES} bytes"}, status_code=413
    )
    await response(
        {"type": "http", "method": "POST", "path": "/", "headers": []},
        _no_body,
        send,
    )


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def _add_health(app: FastAPI) -> None:
    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={503: {"description": "not ready"}})
    async def readyz(request: Request) -> JSONResponse:
        # "ok" or "unavailable" only: why is in the log, not in a public answer.
        checks: dict[str, str] = {}
        try:
            async with request.app.state.session_factory() as session:
                await session.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as error:  # any failure means not ready
            logger.warning("api.not_ready", check="database", error=type(error).__name__)
            checks["database"] = "unavailable"
        try:
            await request.app.state.redis.ping()
            checks["broker"] = "ok"
        except Exception as error:  # any failure means not ready
            logger.warning("api.not_ready", check="broker", error=type(error).__name__)
            checks["broker"] = "unavailable"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


async def _token_refused(request: Request) -> JSONResponse | None:
    """The hot paths check the token inside their one statement, after FastAPI has validated
    the request; so that a caller without a valid token hears 401 before any 422, as from
    every other route, an invalid request to one of them has its token checked here."""
    if getattr(request.scope.get("route"), "openapi_extra", None) is not BEARER_SECURITY:
        return None
    try:
        async with request.app.state.session_factory() as session:
            await authenticate(session, request_bearer_token(request))
    except AuthenticationError as error:
        return JSONResponse({"detail": error.message}, 401, headers={"WWW-Authenticate": "Bearer"})
    except (OperationalError, InterfaceError, OSError):
        return None  # the database is down: the request is invalid anyway
    return None


def _open_budgets_and_exchange(app: FastAPI, settings: Settings) -> None:
    """The users' budgets (service/budgets.py), and the one exchange client the API has (PUT
    /api/credentials asks Bybit what a key may do), made as a worker makes its own
    (workers/runtime.py): its calls count against the same shared limits in Redis."""
    app.state.budgets = Budgets(
        app.state.redis,
        requests_per_minute=settings.user_requests_per_minute,
        request_burst=settings.user_request_burst,
        open_positions=settings.user_open_positions,
    )
    app.state.user_ids = UserIds()
    app.state.http = create_http_session(
        connect_timeout=settings.http_connect_timeout_seconds,
        read_timeout=settings.http_read_timeout_seconds,
        limit=20,
    )
    app.state.exchange_is_demo = settings.bybit_base_url.rstrip("/") == bybit_constants.DEMO
    app.state.exchange = BybitClient(
        app.state.http,
        settings.bybit_base_url,
        recv_window=settings.bybit_recv_window,
        ip_ban_seconds=settings.bybit_ip_ban_seconds,
        gate=RedisCallGate(
            app.state.redis,
            egress=settings.bybit_egress_id,
            share=settings.bybit_limit_share,
            ip_limit=settings.bybit_ip_limit,
            # A person is waiting for the answer: a short wait for a slot, else 503.
            wait_max_seconds=1.0,
        ),
    )


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def domain_error(_: Request, error: DomainError) -> JSONResponse:
        headers = None
        if error.status_code == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        elif isinstance(error, TooManyRequestsError):
            headers = {"Retry-After": str(error.retry_after)}
        elif error.status_code == 503:
            retry_after = getattr(error, "retry_after", None) or 5
            headers = {"Retry-After": str(retry_after)}
            logger.warning("api.unavailable", detail=error.message)
        return JSONResponse({"detail": error.message}, error.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        refused = await _token_refused(request)
        if refused is not None:
            return refused
        # Without the input echo: a rejected credential must not come back in the body.
        details: list[dict[str, Any]] = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in error.errors()
        ]
        return JSONResponse({"detail": details}, 422)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(OSError)
    # The hot paths' pool (asyncpg's own errors): connection lost or refused, server
    # shutting down or out of connections.
    @app.exception_handler(asyncpg.PostgresConnectionError)
    @app.exception_handler(asyncpg.exceptions.OperatorInterventionError)
    @app.exception_handler(asyncpg.exceptions.InsufficientResourcesError)
    async def unavailable(_: Request, error: Exception) -> JSONResponse:
        logger.error("api.dependency_unavailable", error=type(error).__name__)
        return JSONResponse(
            {"detail": "database unavailable, try again shortly"}, 503, headers={"Retry-After": "5"}
        )

    @app.exception_handler(asyncpg.InterfaceError)
    async def driver_error(request: Request, error: Exception) -> JSONResponse:
        # asyncpg says "connection is closed" or "pool is closing" with InterfaceError itself;
        # its subclasses (bad input, configuration, an unsupported feature) are our bugs, and
        # a 503 with Retry-After would hide them.
        if type(error) is asyncpg.InterfaceError or isinstance(
            error, asyncpg.exceptions.ClientCannotConnectError
        ):
            return await unavailable(request, error)
        logger.error("api.database_client_error", error=type(error).__name__)
        return JSONResponse({"detail": "internal error"}, 500)
