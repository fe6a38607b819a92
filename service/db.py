"""Engine and session factories, and the one session scope that commits.

Engines are bound to the event loop that creates them: the API creates its engine in the
FastAPI lifespan, a worker process creates its own on its own loop (workers/runtime.py).
Nothing here runs at import time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

SessionFactory = async_sessionmaker[AsyncSession]
# A callable that opens one unit of work: commit on success, roll back on error.
SessionScope = Callable[[], AbstractAsyncContextManager[AsyncSession]]


def create_engine(database_url: str, *, pool_size: int = 5) -> AsyncEngine:
    return create_async_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No pre-ping: it costs a round trip on every checkout. A connection that turns out
        # dead fails its statement (a 503 in the API, a retried run in a worker) and, being a
        # disconnect, makes the pool replace every connection older than it.
        pool_pre_ping=False,
        # asyncpg's prepared-statement cache is per connection and safe with our pool.
        connect_args={"server_settings": {"application_name": "synthetic-index-trader"}},
    )


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
