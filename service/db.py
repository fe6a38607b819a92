"""Engine and session factories, and the one session scope that commits.

Engines are bound to the event loop that creates them: the API creates its engine in the
FastAPI lifespan, a worker process creates its own on its own loop (workers/runtime.py).
Nothing here runs at import time.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from service.config import Settings

SessionFactory = async_sessionmaker[AsyncSession]
# A callable that opens one unit of work: commit on success, roll back on error.
SessionScope = Callable[[], AbstractAsyncContextManager[AsyncSession]]


APPLICATION_NAME = "synthetic-index-trader"


def _default(name: str) -> Any:
    return Settings.model_fields[name].default


@dataclass(frozen=True, slots=True)
class ConnectionHealth:
    """How a connection notices that its peer is gone, on both ends.

    A run holds its locks on a connection for its whole length; if that connection's peer
    vanishes (node loss, partition), PostgreSQL would keep the locks until the kernel's TCP
    keepalive gives up (about 2 h 11 min with the defaults), and the client would wait as
    long for a reply. So every connection sets keepalives and a user timeout on the client
    socket and, per connection, on the server; a statement has a client-side timeout; and
    the server checks during a long statement whether the client is still there.
    """

    statement_timeout: float = _default("db_statement_timeout_seconds")
    keepalive_idle: int = _default("db_keepalive_idle_seconds")
    keepalive_interval: int = _default("db_keepalive_interval_seconds")
    keepalive_count: int = _default("db_keepalive_count")

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionHealth:
        return cls(
            statement_timeout=settings.db_statement_timeout_seconds,
            keepalive_idle=settings.db_keepalive_idle_seconds,
            keepalive_interval=settings.db_keepalive_interval_seconds,
            keepalive_count=settings.db_keepalive_count,
        )

    @property
    def dead_peer_seconds(self) -> int:
        return self.keepalive_idle + self.keepalive_interval * self.keepalive_count

    def server_settings(self) -> dict[str, str]:
        return {
            "application_name": APPLICATION_NAME,
            "tcp_keepalives_idle": str(self.keepalive_idle),
            "tcp_keepalives_interval": str(self.keepalive_interval),
            "tcp_keepalives_count": str(self.keepalive_count),
            # Unacknowledged data to a vanished client is given up on as fast (PostgreSQL 12+).
            "tcp_user_timeout": str(self.dead_peer_seconds * 1000),
            # During a long statement, check every few seconds that the client still exists
            # (PostgreSQL 14+).
            "client_connection_check_interval": str(self.keepalive_interval * 1000),
        }

    def configure_socket(self, sock: Any) -> None:
        """The client's end: keepalives and a user timeout on a TCP socket (Unix sockets have
        no peer to lose)."""
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (
            ("TCP_KEEPIDLE", self.keepalive_idle),
            ("TCP_KEEPINTVL", self.keepalive_interval),
            ("TCP_KEEPCNT", self.keepalive_count),
            ("TCP_USER_TIMEOUT", self.dead_peer_seconds * 1000),
        ):
            if hasattr(socket, option):  # Linux names; other systems keep their defaults
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def create_engine(
    database_url: str, *, pool_size: int = 5, health: ConnectionHealth | None = None
) -> AsyncEngine:
    health = health or ConnectionHealth()
    engine = create_async_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No pre-ping: it costs a round trip on every checkout. A connection that turns out
        # dead fails its statement (a 503 in the API, a retried run in a worker) and, being a
        # disconnect, makes the pool replace every connection older than it.
        pool_pre_ping=False,
        # A failed statement's parameters stay out of its exception's text (and so out of
        # every logged traceback): they are token hashes, sealed keys, users' data.
        hide_parameters=True,
        # asyncpg's prepared-statement cache is per connection and safe with our pool.
        connect_args={
            "server_settings": health.server_settings(),
            # A statement that hangs (a dead server, a lock never granted) fails with a
            # TimeoutError after this long instead of waiting forever.
            "command_timeout": health.statement_timeout,
        },
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _client_keepalive(dbapi_connection: Any, _record: Any) -> None:
        # asyncpg offers no keepalive option: set it on the connection's own socket.
        transport = getattr(dbapi_connection.driver_connection, "_transport", None)
        health.configure_socket(transport.get_extra_info("socket") if transport else None)

    return engine


class StatementPool:
    """A plain asyncpg pool for the API's hot paths (service/positions/hot_path.py), with the
    same connection health as the engine's: accepting a position and answering a poll are one
    statement each, and the ORM's unit of work and the engine's checkout around them cost more
    CPU than the statement itself. Everything else uses the engine.

    Only single autocommitted statements run on it (`fetchrow`), or one statement in a
    transaction with a transaction-scoped advisory lock (`fetchrow_in_turn`), so a connection
    carries no session state between requests and its release skips asyncpg's reset query (a
    round trip per request). Requests take their turn in arrival order: asyncpg gives a released
    connection to whichever task asks first, and a waiting task that loses goes to the back of
    the line, so under load some requests waited over 20 times the median; a FIFO semaphore
    (fair since Python 3.11.1) in front of it keeps the order.
    """

    def __init__(self, pool: asyncpg.Pool, *, size: int, wait_seconds: float) -> None:
        self._pool = pool
        self._turns = asyncio.Semaphore(size)
        self._wait = wait_seconds

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        # A turn not had in time (the database stalls) is a TimeoutError: a 503, not a queue
        # growing without bound.
        async with asyncio.timeout(self._wait):
            await self._turns.acquire()
        try:
            return await self._pool.fetchrow(query, *args)
        finally:
            self._turns.release()

    async def fetchrow_in_turn(
        self, lock: tuple[int, int], lock_wait_seconds: float, query: str, *args: Any
    ) -> asyncpg.Record | None:
        """`query` in a READ COMMITTED transaction that first takes the two-int advisory lock
        `lock`, held until its commit: statements run this way with the same lock take turns,
        each seeing what the one before it committed (a count that must stay strict under
        concurrent inserts). The lock ends with the transaction, so the connection is released
        clean. Not granted within `lock_wait_seconds`: asyncpg's LockNotAvailableError."""
        async with asyncio.timeout(self._wait):
            await self._turns.acquire()
        try:
            async with (
                self._pool.acquire() as connection,
                connection.transaction(isolation="read_committed"),
            ):
                await connection.execute(ADMISSION_LOCK, *lock, lock_timeout(lock_wait_seconds))
                return await connection.fetchrow(query, *args)
        finally:
            self._turns.release()

    async def close(self) -> None:
        await self._pool.close()


# A transaction-scoped advisory lock, waited for at most the given lock_timeout (local to the
# transaction): how both the hot path and the ORM path take a user's admission lock.
ADMISSION_LOCK = (
    "WITH wait AS MATERIALIZED (SELECT set_config('lock_timeout', $3, true)) "
    "SELECT pg_advisory_xact_lock($1, $2) FROM wait"
)
LOCK_NOT_AVAILABLE = "55P03"


def lock_timeout(seconds: float) -> str:
    """A lock_timeout setting (milliseconds, at least 1) for ADMISSION_LOCK's third parameter."""
    return str(max(1, int(seconds * 1000)))


async def create_pool(
    database_url: str, *, max_size: int = 10, health: ConnectionHealth | None = None
) -> StatementPool:
    """A StatementPool on the running loop. It opens no connection until one is needed, so a
    process starts while the database is down."""
    health = health or ConnectionHealth()

    async def configure(connection: asyncpg.Connection) -> None:
        transport = getattr(connection, "_transport", None)
        health.configure_socket(transport.get_extra_info("socket") if transport else None)

    pool = await asyncpg.create_pool(
        database_url.replace("postgresql+asyncpg://", "postgresql://", 1),
        min_size=0,
        max_size=max_size,
        server_settings=health.server_settings(),
        command_timeout=health.statement_timeout,
        init=configure,
        reset=_keep_session,
    )
    return StatementPool(pool, size=max_size, wait_seconds=health.statement_timeout)


async def _keep_session(_connection: asyncpg.Connection) -> None:
    """The reset on release, in place of asyncpg's `pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL`: single autocommitted statements take no advisory lock, open no
    cursor, listen to nothing and set nothing. An open transaction is still rolled back by
    asyncpg itself before this is called."""


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    # expire_on_commit=False: objects stay readable after commit without hidden I/O.
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


@asynccontextmanager
async def session_scope(factory: SessionFactory) -> AsyncIterator[AsyncSession]:
    """One transaction: commit when the block ends normally, roll back when it raises.

    This is the only place that commits; services add, flush and return.
    """
    async with factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


def scope_for(factory: SessionFactory) -> SessionScope:
    """Bind `session_scope` to a factory, for code that takes a `SessionScope` dependency."""

    def open_scope() -> AbstractAsyncContextManager[AsyncSession]:
        return session_scope(factory)

    return open_scope
